"""Everything that runs inside a device worker process.

The only package of kaas allowed to import ``cuda`` (and only in its ``cuda_*`` modules, the
CUDA backend and its parts, in ``compiler`` and in ``probe``, which counts devices in a
process of its own); the broker process imports just ``wire`` and ``channel`` from here.
Benchmarks in ``bench/`` (the self-check ``bench.cuda_selfcheck``, the baselines) may import
it to time the driver directly.
"""
