"""tenantlib: submit GPU kernel graphs to the kaas broker from any process, no CUDA needed.

    import numpy as np, tenantlib
    from tenantlib import kernels

    with tenantlib.connect() as client:
        lib = kernels.library(client)
        x, y, z = (client.array(1 << 20) for _ in range(3))
        x[:] = np.random.rand(x.size); y[:] = 1.0
        g = client.graph()
        grid, block = kernels.launch_1d(x.size)
        g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), x.size])
        result = client.run(g, timeout=5)
"""

from broker.protocol import KernelSpec, Param, Timings

from . import errors
from ._core import RunResult
from .aio import AsyncClient, connect_async
from .arena import Arena
from .client import Client, PendingRun, connect
from .graph import BufferRef, Graph, Kernel, Library, Resident

__all__ = [
    "connect", "connect_async", "Client", "AsyncClient", "PendingRun", "Arena", "Graph", "BufferRef",
    "Kernel", "Library", "Resident", "RunResult", "Timings", "KernelSpec", "Param", "errors",
]
