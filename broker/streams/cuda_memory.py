"""Host and device memory of the CUDA backend: pinned arenas, residents, device allocations.

A tenant's arena is mapped and page-locked (``cuMemHostRegister``) once, when it is pinned,
never per request: copies between a pinned arena and the device run at full speed, and its
pages are faulted in first, which makes the registration about ten times faster.  A resident
buffer is a device allocation filled once from the broker's host copy.  ``alloc`` hands the
pool's cached blocks back to the driver once before it reports running out of memory.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from .. import errors
from .cuda_errors import OOM, check

__all__ = ["ALIGN", "Arena", "Resident", "alloc", "default_pool", "map_arena", "mib", "prefault", "release_arena",
           "round_up", "upload_resident"]

ALIGN = 256  # device offset of every buffer inside a graph's allocation
_NO_RELEASE = 2**64 - 1
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_PAGE = mmap.PAGESIZE


@dataclass(eq=False, slots=True)
class Arena:
    """A tenant's shared-memory segment, mapped and page-locked for the life of the pin."""

    mm: mmap.mmap
    anchor: Any  # the ctypes object giving ``ptr``; holds an export of ``mm`` until unpinned
    ptr: int
    size: int
    users: int = 0  # graphs submitted and not finished that copy to or from this arena


@dataclass(eq=False, slots=True)
class Resident:
    ptr: int
    size: int
    users: int = 0  # graphs submitted and not finished that read it


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def prefault(mm: mmap.mmap, size: int) -> str:
    """Fault in every page of ``mm`` without changing its contents; returns how."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
        return "madvise"
    except (OSError, ValueError):  # kernel older than 5.14
        pass
    import numpy as np

    view = np.frombuffer(mm, dtype=np.uint8, count=size)
    try:
        int(view[::_PAGE].sum())  # a read fault allocates a shared-memory page
    finally:
        del view
    return "touch"


def map_arena(arena: int, mm: mmap.mmap, size: int) -> Arena:
    """Page-lock the mapping ``mm`` of arena ``arena``; ``mm`` is closed if that fails."""
    anchor = ctypes.c_char.from_buffer(mm)
    ptr = ctypes.addressof(anchor)
    prefault(mm, size)
    try:
        # Registering pre-faulted pages is ~10x faster than letting the driver fault them.
        check(driver.cuMemHostRegister(ptr, round_up(size, _PAGE), 0),
              f"cuMemHostRegister of arena {arena} ({mib(size)})")
    except BaseException:
        del anchor
        mm.close()
        raise
    return Arena(mm, anchor, ptr, size)


def release_arena(a: Arena, *, unregister: bool) -> None:
    """Unlock (when ``unregister``) and unmap a pinned arena."""
    try:
        if unregister:
            check(driver.cuMemHostUnregister(a.ptr), "cuMemHostUnregister")
    finally:
        a.anchor = None
        try:
            a.mm.close()
        except BufferError:  # an export escaped; the mapping goes when it does
            pass


def default_pool(device: Any) -> Any:
    """The device's default memory pool, set to keep what graphs free.

    Freed graph memory stays in the pool for the next graph instead of going back to the
    driver (and then forth again) at every synchronisation.
    """
    pool = check(driver.cuDeviceGetDefaultMemPool(device), "cuDeviceGetDefaultMemPool")
    check(driver.cuMemPoolSetAttribute(
        pool, driver.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        driver.cuuint64_t(_NO_RELEASE)), "cuMemPoolSetAttribute(RELEASE_THRESHOLD)")
    return pool


def alloc(size: int, what: str, pool: Any, device: str) -> int:
    """cuMemAlloc, handing the pool's cached blocks back to the driver once before giving up."""
    res = driver.cuMemAlloc(size)
    if res[0] == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
        check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
        check(driver.cuMemPoolTrimTo(pool, 0), "cuMemPoolTrimTo")
        res = driver.cuMemAlloc(size)
        if res[0] == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            free, total = check(driver.cuMemGetInfo())
            raise errors.DeviceError(
                f"out of device memory allocating {mib(size)} for {what} on {device} "
                f"(free: {mib(int(free))} of {mib(int(total))})",
                detail={"cuda_error": OOM, "bytes": size})
    return int(check(res, f"cuMemAlloc({size}) for {what}"))


def upload_resident(resident: int, mm: mmap.mmap, size: int, pool: Any, device: str) -> Resident:
    """A device copy of the ``size`` bytes mapped at ``mm`` (the caller closes ``mm``)."""
    ptr = alloc(size, f"resident {resident}", pool, device)
    try:
        view = memoryview(mm)
        try:
            check(driver.cuMemcpyHtoD(ptr, view, size), f"copying resident {resident} to the device")
        finally:
            view.release()
    except BaseException:
        driver.cuMemFree(ptr)
        raise
    return Resident(ptr, size)
