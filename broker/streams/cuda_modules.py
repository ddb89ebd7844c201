"""Kernel libraries on the CUDA device: loading images, checking signatures, packing arguments.

A library is a CUDA module (CUBIN compiled by NVRTC for this device's ``sm_XY``, or a
CUBIN/fatbin/PTX image given directly) and the functions of it that a ``KernelSpec`` names.
Each spec is checked against the compiled kernel's parameter sizes (``cuFuncGetParamInfo``)
when it is loaded, so that a launch never reads arguments the kernel does not take.

A launch's arguments live in one ctypes block of one 8-byte slot per parameter (``SLOT``: the
driver copies each parameter from its pointer, reading as many bytes as the parameter has),
packed once per shape: literals at planning time, buffer pointers when they move.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from .. import errors
from ..protocol import KernelSpec, Lit
from .compiler import CompileCache
from .cuda_errors import BAD_IMAGE, check
from .signatures import check_library
from .wire import ExecKernel

__all__ = ["SLOT", "Launch", "Library", "check_signature", "find_function", "literal_packer", "load_module",
           "pack_launch"]

SLOT = {"buf": "Q", "i32": "i4x", "u32": "I4x", "f32": "f4x", "i64": "q", "u64": "Q", "f64": "d"}
_SIZE = {"buf": 8, "i32": 4, "u32": 4, "f32": 4, "i64": 8, "u64": 8, "f64": 8}


@dataclass(eq=False, slots=True)
class Library:
    module: Any
    functions: dict[str, Any]
    specs: dict[str, KernelSpec]
    packers: dict[str, struct.Struct]  # one 8-byte slot per parameter, in order


@dataclass(eq=False, slots=True)
class Launch:
    """One kernel launch of a shape, with its own argument block: literals packed once."""

    function: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    name: str
    index: int
    buffers: tuple[tuple[int, int], ...]  # (byte offset of the slot in ``args``, graph buffer index)
    args: Any  # ctypes buffer: one 8-byte slot per parameter; buffer slots hold the shape's packed pointers
    slots: Any  # ctypes array of pointers to the slots (what the driver reads the arguments through)
    params: int  # address of ``slots``: cuLaunchKernel's kernelParams (0: no parameters)


def literal_packer(kinds: tuple[str, ...]) -> struct.Struct:
    """Packs one value per kind into consecutive 8-byte slots, laid out as in an argument block."""
    return struct.Struct("<" + "".join(SLOT[k] for k in kinds))


def load_module(library: str, fmt: str, data: bytes, options: tuple[str, ...], compiler: CompileCache,
                arch: str, device: str, kernels: tuple[KernelSpec, ...] = ()) -> tuple[Any, str]:
    """Load (compiling CUDA C first) one library image; returns the module and the compile log.

    An image this device refuses is the tenant's input: CompileError.  ``kernels`` are held
    against the source and the CUBIN first (``signatures.check_library``).
    """
    log = ""
    if fmt == "cuda":
        image, log = compiler.compile(bytes(data), arch, tuple(options))
    elif fmt in ("cubin", "fatbin"):
        image = bytes(data)
    elif fmt == "ptx":
        image = bytes(data) if bytes(data).endswith(b"\0") else bytes(data) + b"\0"
    else:
        raise errors.InvalidArgument(f"unknown library format {fmt!r} (expected cuda, cubin, ptx or fatbin)")
    if kernels:
        check_library(fmt, bytes(data), image, kernels, arch, options, compiler, library)
    try:
        if fmt == "ptx":
            module = check(driver.cuModuleLoadDataEx(image, 0, [], []), "cuModuleLoadDataEx")
        else:
            module = check(driver.cuModuleLoadData(image), "cuModuleLoadData")
    except errors.DeviceError as exc:
        name = exc.detail.get("cuda_error", "")
        if name in BAD_IMAGE:
            raise errors.CompileError(
                f"library {library[:12]} ({fmt}) cannot be loaded on {device} ({arch}): {exc}",
                detail={"log": log or str(exc), "cuda_error": name, "arch": arch}) from None
        raise
    return module, str(log)


def find_function(library: str, module: Any, spec: KernelSpec, shared_optin: int = 0) -> Any:
    """The function ``spec`` names in ``module``, its signature checked against the spec.

    With ``shared_optin`` (the device's per-block opt-in limit) the function may take that much
    shared memory (its static shared memory plus the dynamic shared memory of a launch):
    the driver's default cap for dynamic shared memory is 48 KiB.
    """
    res = driver.cuModuleGetFunction(module, spec.name.encode())
    if res[0] == driver.CUresult.CUDA_ERROR_NOT_FOUND:
        raise errors.UnknownKernel(
            f"library {library[:12]} has no kernel {spec.name!r} (CUDA C kernels must be "
            "declared extern \"C\" to keep their plain names)",
            detail={"library": library, "kernel": spec.name})
    function = check(res, f"cuModuleGetFunction({spec.name!r})")
    check_signature(library, spec, function)
    attr = driver.CUfunction_attribute
    static = int(check(driver.cuFuncGetAttribute(attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function),
                       "cuFuncGetAttribute(SHARED_SIZE_BYTES)"))
    room = shared_optin - static
    if room > 48 * 1024:
        check(driver.cuFuncSetAttribute(function, attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, room),
              "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    return function


def check_signature(library: str, spec: KernelSpec, function: Any) -> None:
    """Refuse a KernelSpec whose parameters do not match the compiled kernel's."""
    for p in spec.params:
        if p.kind not in SLOT:
            raise errors.ArgumentError(f"kernel {spec.name!r}: parameter {p.name!r} has unknown kind {p.kind!r}",
                                       detail={"kernel": spec.name, "param": p.name})
    sizes: list[int] = []
    while True:
        res = driver.cuFuncGetParamInfo(function, len(sizes))
        if res[0]:
            break  # past the last parameter (or a driver that cannot tell: nothing to compare)
        sizes.append(int(res[2]))
        if len(sizes) > 4096:
            return
    if not sizes and res[0] != driver.CUresult.CUDA_ERROR_INVALID_VALUE:
        return
    want = [_SIZE[p.kind] for p in spec.params]
    if sizes != want:
        raise errors.ArgumentError(
            f"kernel {spec.name!r} of library {library[:12]} takes {len(sizes)} parameter(s) of "
            f"{sizes} bytes, but its spec declares {len(want)} of {want} bytes",
            detail={"kernel": spec.name, "library": library, "compiled": sizes, "declared": want})


def pack_launch(n: int, k: ExecKernel, nbuffers: int, libraries: Mapping[str, Library], device: str) -> Launch:
    """Kernel ``n`` of a graph as a launch: its function, and its literals packed into its argument block."""
    lib = libraries.get(k.library)
    if lib is None:
        raise errors.UnknownLibrary(f"library {k.library[:12]} is not loaded on {device}",
                                    detail={"library": k.library})
    function = lib.functions.get(k.kernel)
    if function is None:
        raise errors.UnknownKernel(f"library {k.library[:12]} has no kernel {k.kernel!r} loaded",
                                   detail={"library": k.library, "kernel": k.kernel})
    params = lib.specs[k.kernel].params
    where = f"kernel {n} ({k.kernel!r})"
    if len(k.args) != len(params):
        raise errors.ArgumentError(f"{where} takes {len(params)} argument(s), {len(k.args)} given",
                                   detail={"kernel": k.kernel, "index": n})
    values: list[int | float] = []
    buffers: list[tuple[int, int]] = []
    for pos, (p, arg) in enumerate(zip(params, k.args, strict=True)):
        if isinstance(arg, Lit):
            if p.kind == "buf":
                raise errors.ArgumentError(f"{where}: parameter {p.name!r} is a buffer, got a literal",
                                           detail={"kernel": k.kernel, "index": n, "param": p.name})
            values.append(arg.value)
        else:
            if p.kind != "buf":
                raise errors.ArgumentError(f"{where}: parameter {p.name!r} is {p.kind}, got a buffer",
                                           detail={"kernel": k.kernel, "index": n, "param": p.name})
            if not 0 <= arg.index < nbuffers:
                raise errors.ArgumentError(f"{where}: no buffer {arg.index}",
                                           detail={"kernel": k.kernel, "index": n, "param": p.name})
            values.append(0)
            buffers.append((8 * pos, arg.index))
    count = len(params)
    args = ctypes.create_string_buffer(8 * max(count, 1))
    try:
        lib.packers[k.kernel].pack_into(args, 0, *values)
    except (struct.error, OverflowError) as exc:
        raise errors.ArgumentError(f"{where}: a literal does not fit its parameter type: {exc}",
                                   detail={"kernel": k.kernel, "index": n}) from None
    first = ctypes.addressof(args)
    slots = (ctypes.c_void_p * count)(*(first + 8 * i for i in range(count))) if count else None
    grid = (int(k.grid[0]), int(k.grid[1]), int(k.grid[2]))
    block = (int(k.block[0]), int(k.block[1]), int(k.block[2]))
    return Launch(function, grid, block, int(k.shared), k.kernel, n, tuple(buffers), args, slots,
                  ctypes.addressof(slots) if slots is not None else 0)
