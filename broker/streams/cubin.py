"""What a CUBIN says about its kernels, read without a GPU: parameters, shared memory, launch features.

Pure Python over the ELF file (``EM_CUDA``).  Each entry function has a ``.nv.info.<name>``
section of attributes (``EIATTR_*``, one record each: a format byte, an attribute byte, then
a 16-bit value or a 16-bit size and that many bytes).  ``EIATTR_KPARAM_INFO`` gives every
parameter's ordinal, offset and size; others say whether the kernel needs thread-block
clusters, which a plain ``cuLaunchKernel`` cannot form.  Static shared memory is the size of the
kernel's ``.nv.shared.<name>`` section.  (Grid-wide synchronisation is not read: the attribute
that lists cooperative-group instructions is also in kernels without any, CUTLASS GEMMs among
them; such a kernel launched plainly is a runaway the deadline ends.)

Used where an artefact arrives (tenantlib front ends, and the workers that check a declared
signature against the binary); nothing here trusts the bytes: a malformed file raises
``CompileError`` naming what is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CompileError

__all__ = ["CubinKernel", "RawParam", "is_cubin", "read_cubin", "read_symbol"]

_ELF_MAGIC = b"\x7fELF"
_EM_CUDA = 190
_STO_CUDA_ENTRY = 0x10
_SHT_SYMTAB = 2
_SHT_NOBITS = 8
_STT_FUNC = 2

# .nv.info record formats and the attributes read here (names as cuobjdump prints them).
_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL, _EIFMT_SVAL = 1, 2, 3, 4
_EIATTR_MAX_THREADS = 0x05
_EIATTR_REQNTID = 0x10
_EIATTR_KPARAM_INFO = 0x17
_EIATTR_CBANK_PARAM_SIZE = 0x19
_EIATTR_CTA_PER_CLUSTER = 0x3D
_EIATTR_EXPLICIT_CLUSTER = 0x3E


@dataclass(frozen=True, slots=True)
class RawParam:
    """One kernel parameter as the binary lays it out in the parameter bank."""

    ordinal: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class CubinKernel:
    """An entry function of a CUBIN and what launching it takes."""

    name: str
    params: tuple[RawParam, ...]  # by ordinal
    param_bytes: int              # the parameter bank's size
    static_shared: int            # bytes of its .nv.shared section: ``__shared__`` arrays (and, from sm_80, 1 KiB the system reserves)
    max_threads: tuple[int, ...]  # from __launch_bounds__ / .maxntid (empty: none)
    required_threads: tuple[int, ...]  # from .reqntid: the block must be exactly this (empty: any)
    cluster: tuple[int, ...]      # a compile-time cluster shape (empty: none)

    def unsupported(self) -> str:
        """The launch feature kaas cannot give this kernel yet ('' when none)."""
        if self.cluster:
            shape = f"clusters of {self.cluster}" if any(self.cluster) else "a cluster shape given at launch"
            return f"thread-block clusters (the kernel is compiled for {shape}; kaas launches with " \
                   "cuLaunchKernel, which cannot form them)"
        return ""


def is_cubin(data: bytes) -> bool:
    """True for an ELF image of a CUDA device (what NVRTC, nvcc and ptxas write)."""
    return len(data) >= 64 and data[:4] == _ELF_MAGIC and data[4] == 2 and \
        struct.unpack_from("<H", data, 18)[0] == _EM_CUDA


def _bad(what: str) -> CompileError:
    return CompileError(f"not a usable CUBIN: {what}", detail={"log": what})


_MAX_NAME = 4096     # bytes of one section or symbol name
_MAX_KERNELS = 4096  # entry functions in one image
_Section = tuple[int, int, int, int, int, int, int]  # name, type, offset, size, link, info, entsize


def read_cubin(data: bytes) -> dict[str, CubinKernel]:
    """Every entry function of ``data`` (a CUBIN) by name."""
    data = bytes(data)
    if not is_cubin(data):
        raise _bad("no 64-bit CUDA ELF header")
    try:
        sections = _sections(data)
        strtab = sections[struct.unpack_from("<H", data, 0x3E)[0]]
        by_name: dict[str, _Section] = {}
        for sec in sections:
            by_name.setdefault(_string(data, strtab, sec[0], "a section name"), sec)
        kernels: dict[str, CubinKernel] = {}
        for name, _, _, _ in _symbols(data, sections, entries_only=True):
            info = by_name.get(f".nv.info.{name}")
            shared = by_name.get(f".nv.shared.{name}")
            kernels[name] = _kernel(name, data[info[2]:info[2] + info[3]] if info else b"",
                                    shared[3] if shared else 0)
        return kernels
    except struct.error:
        raise _bad("a section or record runs past the end of the file") from None


def read_symbol(data: bytes, name: str) -> bytes:
    """The initial bytes of data symbol ``name`` (a ``__constant__`` or ``__device__`` variable)."""
    data = bytes(data)
    if not is_cubin(data):
        raise _bad("no 64-bit CUDA ELF header")
    try:
        sections = _sections(data)
        for sym, shndx, value, size in _symbols(data, sections, entries_only=False, wanted=name):
            if sym != name:
                continue
            if shndx >= len(sections):
                raise _bad(f"symbol {name!r} is not in a section of the file")
            sec = sections[shndx]
            if sec[1] == _SHT_NOBITS or value + size > sec[3]:
                raise _bad(f"symbol {name!r} has no initial value in the file")
            return data[sec[2] + value:sec[2] + value + size]
    except struct.error:
        raise _bad("a section or record runs past the end of the file") from None
    raise _bad(f"no symbol {name!r}")


def _sections(data: bytes) -> list[_Section]:
    """The section table, every section inside the file."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise _bad("its section table lies outside the file")
    sections: list[_Section] = []
    for i in range(shnum):
        name, typ, _, _, off, size, link, info, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        if typ != _SHT_NOBITS and off + size > len(data):  # NOBITS occupies no file space
            raise _bad(f"section {i} lies outside the file")
        sections.append((name, typ, off, size, link, info, entsize))
    return sections


def _string(data: bytes, table: _Section, at: int, what: str) -> str:
    """The NUL-terminated string at ``at`` in string table section ``table``."""
    if table[1] == _SHT_NOBITS or at >= table[3]:
        raise _bad(f"{what} lies outside its string table")
    start = table[2] + at
    end = data.find(b"\0", start, min(table[2] + table[3], start + _MAX_NAME + 1))
    if end < 0:
        raise _bad(f"{what} is not terminated within {_MAX_NAME} bytes")
    return data[start:end].decode("utf-8", "replace")


def _symbols(data: bytes, sections: list[_Section], *, entries_only: bool,
             wanted: str = "") -> list[tuple[str, int, int, int]]:
    """(name, section index, value, size) of the kernel entry points, or of every symbol named
    ``wanted`` (names of other symbols are not decoded)."""
    out: list[tuple[str, int, int, int]] = []
    raw = wanted.encode()
    for _, typ, off, size, link, _, entsize in sections:
        if typ != _SHT_SYMTAB:
            continue
        if entsize < 24 or link >= len(sections):
            raise _bad("a malformed symbol table")
        strings = sections[link]
        for at in range(off, off + size - entsize + 1, entsize):
            st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, at)
            if entries_only:
                if st_info & 0xF != _STT_FUNC or not st_other & _STO_CUDA_ENTRY:
                    continue
                if len(out) >= _MAX_KERNELS:
                    raise _bad(f"more than {_MAX_KERNELS} kernels in one image")
            elif not data.startswith(raw + b"\0", strings[2] + st_name) or st_name >= strings[3]:
                continue
            out.append((_string(data, strings, st_name, "a symbol name"), st_shndx, st_value, st_size))
    return out


def _kernel(name: str, info: bytes, static_shared: int) -> CubinKernel:
    params: dict[int, RawParam] = {}
    param_bytes = 0
    max_threads: tuple[int, ...] = ()
    required: tuple[int, ...] = ()
    cluster: tuple[int, ...] = ()
    at = 0
    while at + 4 <= len(info):
        fmt, attr = info[at], info[at + 1]
        if fmt == _EIFMT_SVAL:
            (size,) = struct.unpack_from("<H", info, at + 2)
            value = info[at + 4:at + 4 + size]
            if len(value) != size:
                raise _bad(f"an attribute of kernel {name!r} runs past its section")
            at += 4 + size
        elif fmt in (_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL):
            value = info[at + 2:at + 4]
            at += 4
        else:
            raise _bad(f"unknown attribute format {fmt} in kernel {name!r}")
        if attr == _EIATTR_KPARAM_INFO and len(value) >= 12:
            _, ordinal, offset, flags = struct.unpack_from("<IHHI", value)
            params[ordinal] = RawParam(ordinal, offset, (flags >> 18) & 0x3FFF)
        elif attr == _EIATTR_CBANK_PARAM_SIZE and fmt == _EIFMT_HVAL:
            (param_bytes,) = struct.unpack_from("<H", value)
        elif attr in (_EIATTR_MAX_THREADS, _EIATTR_REQNTID, _EIATTR_CTA_PER_CLUSTER) and len(value) >= 12:
            dims = struct.unpack_from("<III", value)
            if attr == _EIATTR_MAX_THREADS:
                max_threads = dims
            elif attr == _EIATTR_REQNTID:
                required = dims
            else:
                cluster = dims
        elif attr == _EIATTR_EXPLICIT_CLUSTER and not cluster:
            cluster = (0, 0, 0)  # a cluster shape chosen at launch time
    ordered = tuple(params[i] for i in sorted(params))
    if [p.ordinal for p in ordered] != list(range(len(ordered))):
        raise _bad(f"kernel {name!r} has gaps in its parameter list")
    return CubinKernel(name, ordered, param_bytes, static_shared, max_threads, required, cluster)

