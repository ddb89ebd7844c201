"""CUDA C -> CUBIN with NVRTC (from PyPI), with an on-disk cache; PTX -> CUBIN with nvJitLink.

Runs inside device workers and tenant processes (front ends, tests), never in the broker.  One error
boundary: NVRTC result codes become ``CompileError`` (tenant's source, with the log) or
``InternalError`` (the toolchain itself).  CUBIN, not PTX: PTX from a newer NVRTC is
refused by an older driver, CUBIN for the device's own ``sm_XY`` loads.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CompileError, InternalError

_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
# Options a tenant may pass; anything touching files or the host is refused.
_ALLOWED_OPTION = re.compile(
    r"^(-D[A-Za-z_][A-Za-z0-9_]*(=[^\s]*)?|-U[A-Za-z_][A-Za-z0-9_]*|--use_fast_math|-use_fast_math"
    r"|--std=c\+\+(11|14|17|20)|-std=c\+\+(11|14|17|20)|--fmad=(true|false)|-lineinfo|--extra-device-vectorization"
    r"|--maxrregcount=\d+|-maxrregcount=\d+|--restrict|-restrict)$"
)


@lru_cache(maxsize=1)
def _nvrtc():  # type: ignore[no-untyped-def]
    from cuda.bindings import nvrtc

    return nvrtc


def nvrtc_available() -> bool:
    """True when the NVRTC library can be loaded (no GPU needed)."""
    try:
        nvrtc_version()
    except Exception:
        return False
    return True


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return int(major), int(minor)


def _check(err: object, what: str) -> None:
    nvrtc = _nvrtc()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, name = nvrtc.nvrtcGetErrorString(err)
        raise InternalError(f"{what} failed: {name.decode(errors='replace')}")


# A preprocessor directive that reads a file (``#`` or the ``%:`` digraph, then ``include``,
# ``include_next``, ``import`` or ``embed``), and ``__has_include`` (which tells whether a file
# exists), anywhere in the code once comments and literals are blanked out.
_READS_FILES = re.compile(rb"(?:#|%:)[ \t]*(?:include|include_next|import|embed)\b|__has_include")
_RAW_OPEN = re.compile(rb'(?:u8|u|U|L)?R"([^()\\ \t\n]{0,16})\(')
_SPECIAL = re.compile(rb'//|/\*|"|\'|(?:u8|u|U|L)?R"')


def code_only(source: bytes) -> bytes:
    """``source`` with line splices joined and comments, string and character literals blanked,
    so that nothing the preprocessor would read as a directive hides in them (or they in it)."""
    src = re.sub(rb"\\\r?\n", b"", source)
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        m0 = _SPECIAL.search(src, i)  # plain code up to the next comment or literal is kept as it is
        if m0 is None:
            out += src[i:]
            break
        out += src[i:m0.start()]
        i = m0.start()
        c = src[i:i + 1]
        if src.startswith(b"//", i):
            j = src.find(b"\n", i)
            i = n if j < 0 else j
            out += b" "
        elif src.startswith(b"/*", i):
            j = src.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
            out += b" "
        elif (m := _RAW_OPEN.match(src, i)) is not None and (i == 0 or not src[i - 1:i].isalnum()):
            end = src.find(b")" + m.group(1) + b'"', m.end())
            i = n if end < 0 else end + len(m.group(1)) + 2
            out += b'""'
        elif c in (b'"', b"'"):
            j = i + 1
            while j < n and src[j:j + 1] not in (c, b"\n"):
                j += 2 if src[j:j + 1] == b"\\" else 1
            i = j + 1
            out += c + c
        else:
            out += c
            i += 1
    return bytes(out)


def refuse_includes(source: bytes) -> None:
    """CompileError if tenant source asks the compiler to read a file.

    NVRTC reads any path the worker can (``#include "/etc/shadow"``) and quotes it back in
    its log, and there are no CUDA headers on a broker's include path to want anyway.
    """
    code = code_only(source)
    m = _READS_FILES.search(code)
    if m is not None:
        line = code.count(b"\n", 0, m.start()) + 1
        raise CompileError(f"CUDA C sent to the broker may not include files (line {line}: "
                           f"{m.group(0).strip().decode(errors='replace')!r}): paste what it needs into the source",
                           detail={"log": "", "line": line})


def _program_log(nvrtc: Any, prog: Any) -> str:
    err, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
    _check(err, "nvrtcGetProgramLogSize")
    # NVRTC writes into the buffer: it must be a fresh mutable object. ``b" " * 1`` is CPython's
    # interned one-byte b" ", and writing NUL into it corrupts every b" " in the process.
    log_buf = bytearray(log_size)
    (err,) = nvrtc.nvrtcGetProgramLog(prog, log_buf)
    _check(err, "nvrtcGetProgramLog")
    return bytes(log_buf).rstrip(b"\x00 ").decode(errors="replace")


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    """Put ``data`` at ``directory/name`` whole or not at all; a cache that cannot be written is skipped."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / name)
    except OSError:
        pass


def check_options(options: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    bad = [o for o in options if not _ALLOWED_OPTION.match(o)]
    if bad:
        raise CompileError(f"compiler option(s) not allowed: {', '.join(map(repr, bad))}",
                           detail={"log": "", "options": list(bad)})
    return tuple(options)


def compile_cuda(source: bytes, arch: str, options: tuple[str, ...] = (), name: str = "kernels.cu",
                 include_dirs: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile CUDA C ``source`` to a CUBIN for ``arch`` (``sm_90``); returns (cubin, log).

    Raises CompileError with the compiler log in ``detail['log']`` when the source is bad.
    ``include_dirs`` are for callers' own headers (tenantlib's CUTLASS front end, compiling in
    the tenant's process); without them the source may not include files at all
    (``refuse_includes``), and ``options`` cannot name files either.
    """
    if not include_dirs:
        refuse_includes(source)
    if not _ARCH.match(arch):
        raise InternalError(f"not a CUDA architecture: {arch!r} (expected like 'sm_90')")
    options = check_options(options)
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source, name.encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", *(o.encode() for o in options),
                *(f"-I{d}".encode() for d in include_dirs)]
        (cerr,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _program_log(nvrtc, prog)
        if cerr != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, ename = nvrtc.nvrtcGetErrorString(cerr)
            raise CompileError(
                f"NVRTC could not compile {name} for {arch} ({ename.decode(errors='replace')}):\n{log}",
                detail={"log": log, "arch": arch},
            )
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        cubin = bytearray(size)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "nvrtcGetCUBIN")
        return bytes(cubin), log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def lowered_names(source: bytes, expressions: list[str], arch: str, options: tuple[str, ...] = ()) -> list[str]:
    """What NVRTC lowers each name expression of ``source`` to (``nvrtcGetLoweredName``).

    Compiles ``source`` once without keeping the code: ``signatures`` reads kernel parameter
    types from the mangled names of probe templates.
    """
    refuse_includes(source)
    if not _ARCH.match(arch):
        raise InternalError(f"not a CUDA architecture: {arch!r} (expected like 'sm_90')")
    options = check_options(options)
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(source, b"signatures.cu", 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        for expr in expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            _check(err, "nvrtcAddNameExpression")
        opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", *(o.encode() for o in options)]
        (cerr,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if cerr != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = _program_log(nvrtc, prog)
            raise CompileError(f"NVRTC could not read the kernels' parameter types for {arch}:\n{log}",
                               detail={"log": log, "arch": arch})
        out = []
        for expr in expressions:
            err, name = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            _check(err, f"nvrtcGetLoweredName({expr!r})")
            out.append(name.decode() if isinstance(name, bytes) else str(name))
        return out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def link_ptx(ptx: bytes, arch: str, name: str = "kernels.ptx") -> bytes:
    """PTX -> CUBIN for ``arch`` with nvJitLink (no GPU, no driver): what a front end whose
    compiler writes PTX (Numba) registers, since PTX newer than a driver knows would not load.

    Raises CompileError with nvJitLink's log when the PTX is refused.
    """
    if not _ARCH.match(arch):
        raise InternalError(f"not a CUDA architecture: {arch!r} (expected like 'sm_90')")
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, ptx, len(ptx), name)
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            text = bytes(log).rstrip(b"\0").decode(errors="replace")
            raise CompileError(f"nvJitLink could not build a CUBIN for {arch}: {exc}\n{text}",
                               detail={"log": text, "arch": arch}) from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin)
    finally:
        nvjitlink.destroy(handle)


def default_cache_dir() -> Path:
    base = os.environ.get("KAAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kaas")
    return Path(base) / "cubin"


class CompileCache:
    """CUBINs on disk keyed by (source, arch, options, NVRTC version); writes are atomic.

    A cache that cannot be written (read-only home, full disk) degrades to compiling.
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def key(self, source: bytes, arch: str, options: tuple[str, ...]) -> str:
        h = hashlib.blake2b(digest_size=20)
        for part in (source, arch.encode(), "\0".join(options).encode(), repr(nvrtc_version()).encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()

    def compile(self, source: bytes, arch: str, options: tuple[str, ...] = (), name: str = "kernels.cu",
                include_dirs: tuple[str, ...] = (), headers_key: str = "") -> tuple[bytes, str]:
        """``compile_cuda`` through the cache; ``headers_key`` names the versions of the headers
        in ``include_dirs`` (they are part of what was compiled)."""
        options = check_options(options)
        keyed = source + b"\0" + headers_key.encode() if include_dirs else source
        path = self.directory / f"{self.key(keyed, arch, options)}.cubin"
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if data:
            self.hits += 1
            return data, ""
        self.misses += 1
        cubin, log = compile_cuda(source, arch, options, name, include_dirs)
        _write_atomically(self.directory, path.name, cubin)
        return cubin, log

    def lowered(self, source: bytes, expressions: list[str], arch: str, options: tuple[str, ...] = ()) -> list[str]:
        """``lowered_names``, remembered on disk like CUBINs (one line per expression)."""
        options = check_options(options)
        key = self.key(source + b"\0" + "\0".join(expressions).encode(), arch, options)
        path = self.directory / f"{key}.names"
        try:
            names = path.read_text().split("\n")
        except (OSError, UnicodeDecodeError):
            names = []
        if len(names) == len(expressions) and all(names):
            self.hits += 1
            return names
        self.misses += 1
        names = lowered_names(source, expressions, arch, options)
        _write_atomically(self.directory, path.name, "\n".join(names).encode())
        return names
