"""Kernel signatures a tenant does not write by hand: read from CUDA C, a C prototype, or a CUBIN.

``client.library(source)`` with no ``kernels=`` compiles the source here with NVRTC (no GPU
and no CUDA context needed; cached on disk) and reads every ``extern "C" __global__`` kernel's
parameters from the compiler (``broker.streams.signatures``): a pointer to const is an input
buffer, any other pointer is read and written (``inout``) unless ``access=`` narrows it to
``in`` or ``out``, and scalars keep their exact C type.  For a binary from elsewhere (a CUBIN,
PTX or fatbin), ``kernels=`` may give each kernel's C parameter list instead of ``KernelSpec``s::

    client.library(cubin, kernels={"vadd": "const float* a, const float* b, float* c, int n"})

Whatever the signatures come from, the broker's device workers hold them against the binary again
(a CUBIN's parameter table; on a GPU, the sizes the driver reports for PTX and fatbin too) and,
for CUDA C, against the types in the source, so a wrong one is refused at registration, naming
the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from broker import errors
from broker.protocol import KernelSpec, Param
from broker.streams import signatures
from broker.streams.cubin import is_cubin, read_cubin

__all__ = ["DEFAULT_ARCH", "KernelsArg", "parse_arch", "resolve_kernels"]

DEFAULT_ARCH = "sm_90"  # types do not depend on the architecture: any NVRTC accepts will do
KernelsArg = Sequence[KernelSpec] | Mapping[str, str] | None
AccessArg = Mapping[str, Mapping[str, str]] | None


def parse_arch(arch: str) -> tuple[int, int]:
    """``"sm_90"`` (or ``"sm_90a"``) -> (9, 0); InvalidArgument for anything else."""
    digits = arch.removeprefix("sm_").rstrip("af")
    if not arch.startswith("sm_") or not digits.isdigit() or len(digits) < 2:
        raise errors.InvalidArgument(f"not a CUDA architecture: {arch!r} (expected like 'sm_90')")
    return int(digits[:-1]), int(digits[-1])


def _cache():  # type: ignore[no-untyped-def]
    from broker.streams.compiler import CompileCache, nvrtc_available

    if not nvrtc_available():
        raise errors.CompileError("reading kernel signatures needs NVRTC here (pip install nvidia-cuda-nvrtc), "
                                  "or pass kernels= with each kernel's signature", detail={"log": ""})
    return CompileCache()


def resolve_kernels(fmt: str, data: bytes, kernels: KernelsArg, *, access: AccessArg = None,
                    hosts: Mapping[str, str] | None = None, arch: str = "",
                    options: Sequence[str] = ()) -> tuple[KernelSpec, ...]:
    """The signatures to register ``data`` (a library of format ``fmt``) with."""
    arch = arch or DEFAULT_ARCH
    opts = tuple(options)
    if kernels is not None and not isinstance(kernels, Mapping):
        specs = tuple(kernels)
        if access or hosts:
            raise errors.InvalidArgument("access= and hosts= apply to signatures kaas reads; with kernels= as "
                                         "KernelSpecs, put them in the specs")
        if not all(isinstance(k, KernelSpec) for k in specs):
            raise errors.InvalidArgument("kernels= must be KernelSpecs, or a mapping of kernel name to its C "
                                         "parameter list")
        return specs
    if kernels is not None:
        return _from_prototypes(kernels, access, hosts, arch)
    if fmt == "cuda":
        cache = _cache()
        image, _ = cache.compile(data, arch, opts)
        found = signatures.derive(data, read_cubin(image), arch, opts, hosts=hosts, cache=cache)
        return _narrow(found, access)
    if fmt == "cubin" and is_cubin(data):
        listed = "; ".join(f"{k.name}({', '.join(f'{p.size} bytes' for p in k.params)})"
                           for k in read_cubin(data).values())
        raise errors.InvalidArgument(
            "a CUBIN's parameter table gives sizes, not types: pass kernels= with each kernel's C parameter list, "
            f"e.g. {{'vadd': 'const float* a, float* b, int n'}} (this CUBIN has: {listed or 'no kernels'})")
    raise errors.InvalidArgument(f"a {fmt} library needs kernels=: each kernel's C parameter list or KernelSpec")


def _from_prototypes(protos: Mapping[str, str], access: AccessArg, hosts: Mapping[str, str] | None,
                     arch: str) -> tuple[KernelSpec, ...]:
    """Signatures from C parameter lists, read by NVRTC as declarations of extern "C" kernels."""
    for name, proto in protos.items():
        if not name.isidentifier() or not isinstance(proto, str):
            raise errors.InvalidArgument(f"kernels= maps kernel names to C parameter lists; got {name!r}: {proto!r}")
        if any(c in proto for c in ";{}#"):
            raise errors.InvalidArgument(f"the parameter list of {name!r} must be a plain C parameter list: {proto!r}")
    source = "".join(f'extern "C" __global__ void {name}({proto});\n' for name, proto in protos.items()).encode()
    found = signatures.source_signatures(source, list(protos), arch, (), _cache())
    hosts = dict(hosts or {})
    unknown = set(hosts) - set(protos)
    if unknown:
        raise errors.SignatureMismatch(f"hosts= names kernel {sorted(unknown)[0]!r}, which kernels= does not list")
    return _narrow(tuple(KernelSpec(k, found[k], hosts.get(k, "")) for k in protos), access)


def _narrow(specs: tuple[KernelSpec, ...], access: AccessArg) -> tuple[KernelSpec, ...]:
    """Apply ``access`` ({kernel: {param: "in" | "out"}}) to read-write pointer parameters."""
    access = {k: dict(v) for k, v in (access or {}).items()}
    by_name = {s.name: s for s in specs}
    for k in access:
        if k not in by_name:
            raise errors.SignatureMismatch(f"access= names kernel {k!r}; the library has: {', '.join(sorted(by_name))}",
                                           detail={"kernel": k})
    out = []
    for spec in specs:
        want = access.get(spec.name, {})
        params = list(spec.params)
        names = [p.name for p in params]
        for pname, mode in want.items():
            if pname not in names:
                raise errors.SignatureMismatch(f"kernel {spec.name!r} has no parameter {pname!r} "
                                               f"(it has: {', '.join(names)})",
                                               detail={"kernel": spec.name, "param": pname})
            i = names.index(pname)
            p = params[i]
            if mode not in ("in", "out", "inout"):
                raise errors.InvalidArgument(f"access of {spec.name}.{pname} must be in, out or inout, got {mode!r}")
            if p.kind != "buf":
                raise errors.SignatureMismatch(f"parameter {pname!r} of kernel {spec.name!r} is a {p.kind} scalar, "
                                               "not a buffer", detail={"kernel": spec.name, "param": pname})
            if p.access == "in" and mode != "in":
                raise errors.SignatureMismatch(
                    f"parameter {pname!r} of kernel {spec.name!r} is a const pointer: the kernel cannot write "
                    f"through it, so it cannot be {mode}", detail={"kernel": spec.name, "param": pname})
            params[i] = Param(p.name, "buf", mode, p.dtype)
        out.append(KernelSpec(spec.name, tuple(params), spec.host))
    return tuple(out)
