"""Everything that runs inside a device worker process.

The only package of kaas allowed to import ``cuda`` (and only in ``cuda_backend`` and
``compiler``); the broker process imports just ``wire`` and ``channel`` from here.
"""
