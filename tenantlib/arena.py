"""Arenas: shared-memory segments a tenant maps and hands to the broker by fd.

Segments are memfds (they never have a name) or, where memfd is missing, POSIX segments
unlinked as soon as mapped: nothing is left in /dev/shm; the broker receives the fd itself
(SCM_RIGHTS).  Arrays are numpy views into
the mapping; any C-contiguous view of an arena can be a graph buffer.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import posix_ipc

from . import errors

PAGE = mmap.PAGESIZE
ALIGN = 256


def create_segment(size: int) -> tuple[int, mmap.mmap]:
    """A new anonymous segment of ``size`` bytes: (fd, mapping).

    A memfd (shared memory that never has a name) where the kernel offers it, so a tenant killed
    at any instant leaves nothing in /dev/shm; otherwise a POSIX segment whose name is unlinked
    as soon as it is mapped.
    """
    if size <= 0:
        raise errors.InvalidArgument(f"arena size must be positive, got {size}")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("kaas-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
    shm = posix_ipc.SharedMemory(None, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        shm.close_fd()
        raise
    finally:
        shm.unlink()
    return shm.fd, mm


class Arena:
    """A segment registered with the broker. ``array()`` carves numpy arrays out of it."""

    def __init__(self, id: int, size: int, mm: mmap.mmap, release: Callable[[Arena], None]) -> None:
        self.id = id
        self.size = size
        self._mm = mm
        self._release = release
        self._bytes = np.frombuffer(mm, dtype=np.uint8)
        self.base = int(self._bytes.ctypes.data)
        self._next = 0
        self.closed = False

    def array(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A new array in the free part of the arena (256-byte aligned); never moves."""
        self._check_open()
        dt = np.dtype(dtype)
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
        start = -(-self._next // ALIGN) * ALIGN
        if start + nbytes > self.size:
            raise errors.InvalidArgument(
                f"arena {self.id} has {self.size - start} bytes free, {nbytes} requested")
        self._next = start + nbytes
        return self._bytes[start:start + nbytes].view(dt).reshape(shape_t)

    def locate(self, arr: np.ndarray) -> int | None:
        """Offset of ``arr``'s first byte in this arena, or None when it lies elsewhere."""
        addr = int(arr.__array_interface__["data"][0])
        if self.base <= addr and addr + arr.nbytes <= self.base + self.size:
            return addr - self.base
        return None

    def _check_open(self) -> None:
        if self.closed:
            raise errors.ArenaClosed(f"arena {self.id} is closed")

    def close(self) -> None:
        """Release the arena in the broker. Views stay readable here until dropped. Idempotent."""
        if not self.closed:
            self.closed = True
            self._release(self)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Arena {self.id} {self.size} bytes{' closed' if self.closed else ''}>"


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
