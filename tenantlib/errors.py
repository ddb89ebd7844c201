"""The typed errors a tenant catches: the same classes the broker raises (``broker.errors``)."""

from broker.errors import *  # noqa: F403
from broker.errors import __all__  # noqa: F401
