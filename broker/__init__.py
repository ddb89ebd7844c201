"""kaas broker: the privileged daemon that owns the GPUs. Never imports CUDA."""

__version__ = "0.1.0"
