"""``python -m broker.streams.probe``: print how many CUDA devices this machine has (0 if none).

Runs in its own process so that the broker never loads the CUDA driver.
"""

from __future__ import annotations


def cuda_device_count() -> int:
    try:
        from cuda.bindings import driver
    except Exception:
        return 0
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return 0
        err, n = driver.cuDeviceGetCount()
        return int(n) if err == driver.CUresult.CUDA_SUCCESS else 0
    except Exception:
        return 0


if __name__ == "__main__":
    print(cuda_device_count())
