"""Kernel signatures from CUDA C source, read by the compiler, and checks of declared ones.

NVRTC knows each kernel's exact parameter types; it tells them through the mangled name of a
probe template instantiated on the kernel's function type::

    template <typename T> __global__ void __kaas_signature_probe() {}
    // name expression "__kaas_signature_probe<decltype(vadd)>" lowers to
    // _Z22__kaas_signature_probeIFvPKfS1_PfiEEvv  ->  void (const float*, const float*, float*, int)

``function_type`` decodes the part of the Itanium C++ ABI mangling such a type uses (builtin
types, pointers, cv-qualifiers, named and nested class types, substitutions).  A pointer to
``const T`` becomes an ``in`` buffer, any other pointer ``inout`` (a tenant narrows it to
``out``); a scalar becomes the ``i32``/``u32``/``i64``/``u64``/``f32``/``f64`` of its C type.
A type kaas cannot pass (a struct by value, ``short``, a tensor-map descriptor) is named
in the error.  Parameter names come from the kernel's declaration when it can be read plainly,
else ``arg0``, ``arg1``...

``check_library`` holds declared signatures (hand-written or read here) against what the
source and the binary say, and refuses the first parameter that disagrees, by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CompileError, SignatureMismatch, UnknownKernel, UnsupportedFeature
from ..protocol import DTYPES, SCALAR_TYPES, KernelSpec, Param
from .cubin import CubinKernel, is_cubin, read_cubin

if TYPE_CHECKING:
    from .compiler import CompileCache

__all__ = ["CType", "check_binary", "check_declared", "check_library", "derive", "function_type", "kernel_params",
           "source_signatures"]

_PROBE = "__kaas_signature_probe"
_PROBE_SOURCE = f"\ntemplate <typename T> __global__ void {_PROBE}() {{}}\n"

# Itanium builtin type codes -> C spelling (the ones a kernel parameter can have).
_BUILTIN = {
    "v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char", "s": "short",
    "t": "unsigned short", "i": "int", "j": "unsigned int", "l": "long", "m": "unsigned long",
    "x": "long long", "y": "unsigned long long", "n": "__int128", "o": "unsigned __int128",
    "f": "float", "d": "double", "e": "long double", "w": "wchar_t", "Dh": "__fp16", "Dn": "nullptr_t",
    "DF16_": "_Float16", "Ds": "char16_t", "Di": "char32_t", "Du": "char8_t",
}
# C type -> kaas scalar kind (what a literal argument is packed as), with the LP64 sizes of CUDA.
_SCALAR = {"int": "i32", "unsigned int": "u32", "long": "i64", "unsigned long": "u64", "long long": "i64",
           "unsigned long long": "u64", "float": "f32", "double": "f64"}
# C type (or struct name) pointed to -> the buffer dtype it pins ('' : any).
_POINTEE = {
    "signed char": "int8", "char": "int8", "unsigned char": "uint8", "bool": "uint8", "short": "int16",
    "unsigned short": "uint16", "int": "int32", "unsigned int": "uint32", "long": "int64",
    "unsigned long": "uint64", "long long": "int64", "unsigned long long": "uint64", "float": "float32",
    "double": "float64", "_Float16": "float16", "__half": "float16", "half": "float16", "void": "",
}
assert set(_SCALAR.values()) <= set(SCALAR_TYPES) and set(_POINTEE.values()) <= {*DTYPES, ""}
_TENSOR_MAPS = {"CUtensorMap", "CUtensorMap_st"}
_SIZE = {"i32": 4, "u32": 4, "f32": 4, "i64": 8, "u64": 8, "f64": 8, "buf": 8}


@dataclass(frozen=True, slots=True)
class CType:
    """A decoded C type: a builtin or named type, or a pointer to one, with cv-qualifiers."""

    name: str = ""              # builtin spelling or (qualified) class name; '' for a pointer
    pointee: CType | None = None
    const: bool = False
    volatile: bool = False
    template: bool = False      # a class template instance (``name<...>``)

    def __str__(self) -> str:
        quals = ("const " if self.const else "") + ("volatile " if self.volatile else "")
        if self.pointee is not None:
            return f"{self.pointee}*" + (" const" if self.const else "")
        return quals + self.name + ("<...>" if self.template else "")


class _Demangler:
    """A recursive-descent reader of one mangled function type, with the ABI's substitutions."""

    MAX_DEPTH = 64  # nested types (pointers to pointers...): deeper is refused, not recursed into

    def __init__(self, text: str, subs: list[CType]) -> None:
        self.s = text
        self.i = 0
        self.subs = subs
        self.depth = 0

    def fail(self, what: str) -> CompileError:
        return CompileError(f"cannot read the mangled type {self.s!r} at {self.i}: {what}", detail={"log": what})

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def take(self, n: int = 1) -> str:
        part = self.s[self.i:self.i + n]
        if len(part) != n:
            raise self.fail("unexpected end")
        self.i += n
        return part

    def number(self) -> int:
        start = self.i
        while self.peek().isdigit():
            self.i += 1
        if start == self.i:
            raise self.fail("expected a length")
        return int(self.s[start:self.i])

    def source_name(self) -> str:
        n = self.number()
        return self.take(n)

    def function(self) -> tuple[CType, list[CType]]:
        """``F <return> <param>* E`` (``v`` alone: no parameters)."""
        if self.take() != "F":
            raise self.fail("expected a function type")
        ret = self.type()
        params: list[CType] = []
        while self.peek() != "E":
            params.append(self.type())
        self.take()
        if len(params) == 1 and params[0] == CType("void"):
            params = []
        return ret, params

    def substitution(self) -> CType:
        self.take()  # S
        if self.peek() == "_":
            self.take()
            at = 0
        else:
            digits = ""
            while self.peek() and (self.peek().isdigit() or self.peek().isupper()):
                digits += self.take()
            if not digits or self.take() != "_":  # St, Sa, Ss...: std:: names, never a kernel parameter
                raise self.fail("a substitution kaas does not read (std:: names are not kernel parameters)")
            at = int(digits, 36) + 1
        if at >= len(self.subs):
            raise self.fail(f"substitution {at} of {len(self.subs)}")
        return self.subs[at]

    def type(self) -> CType:
        self.depth += 1
        if self.depth > self.MAX_DEPTH:
            raise self.fail(f"types nested deeper than {self.MAX_DEPTH}")
        try:
            return self._type()
        finally:
            self.depth -= 1

    def _type(self) -> CType:
        c = self.peek()
        if c in ("K", "V", "r"):
            const = volatile = False
            while self.peek() in ("K", "V", "r"):
                q = self.take()
                const |= q == "K"
                volatile |= q == "V"
            inner = self.type()
            t = CType(inner.name, inner.pointee, const or inner.const, volatile or inner.volatile, inner.template)
            self.subs.append(t)
            return t
        if c == "P":
            self.take()
            t = CType(pointee=self.type())
            self.subs.append(t)
            return t
        if c in ("R", "O"):
            raise self.fail("a reference parameter")
        if c == "S":
            return self.template_args(self.substitution())  # a substituted template name may take arguments
        if c == "F":
            self.function()
            t = CType("(function)")
            self.subs.append(t)
            return t
        if c == "N":
            return self.nested()
        if c.isdigit():
            name = self.source_name()
            t = CType(name)
            self.subs.append(t)
            return self.template_args(t)
        for code in ("DF16_", "Dh", "Dn", "Ds", "Di", "Du"):
            if self.s.startswith(code, self.i):
                self.i += len(code)
                return CType(_BUILTIN[code])
        if c in _BUILTIN and c != "D":
            self.take()
            return CType(_BUILTIN[c])
        raise self.fail(f"unsupported type code {c!r}")

    def nested(self) -> CType:
        """``N [K|V] <prefix>+ E``: a qualified name, each prefix a substitution candidate."""
        self.take()  # N
        parts: list[str] = []
        t = CType("")
        while self.peek() != "E":
            if self.peek() == "S":
                t = self.substitution()
                parts = [t.name]
                continue
            if self.peek() == "I":
                t = self.template_args(t)
                continue
            parts.append(self.source_name())
            t = CType("::".join(parts))
            self.subs.append(t)
        self.take()
        return t

    def template_args(self, t: CType) -> CType:
        """``I <arg>+ E`` after a template name: read (types) or skipped (literals), then the instance."""
        if self.peek() != "I":
            return t
        self.take()
        while self.peek() != "E":
            if self.peek() == "L":  # a literal argument: L <builtin type> <value> E
                self.take()
                if self.peek() == "_":
                    raise self.fail("a template argument that is an address")
                while self.take() != "E":
                    pass
            else:
                self.type()
        self.take()
        t = CType(t.name, template=True)
        self.subs.append(t)
        return t


def function_type(lowered: str) -> list[CType]:
    """The parameter types of the function type a probe name expression lowered to."""
    prefix = f"_Z{len(_PROBE)}{_PROBE}I"
    if not lowered.startswith(prefix):
        raise CompileError(f"unexpected lowered probe name {lowered!r}", detail={"log": lowered})
    d = _Demangler(lowered[len(prefix):], [CType(_PROBE, template=True)])
    _, params = d.function()
    if d.s[d.i:] != "Evv":  # the template's argument list closes, then its own type: void ()
        raise d.fail("trailing text after the function type")
    return params


def kernel_params(kernel: str, types: list[CType], names: list[str] | None = None) -> tuple[Param, ...]:
    """kaas parameters for C parameter ``types`` (``UnsupportedFeature`` names one kaas cannot pass)."""
    if names is None or len(names) != len(types):
        names = [f"arg{i}" for i in range(len(types))]
    out: list[Param] = []
    for i, (name, t) in enumerate(zip(names, types, strict=True)):
        where = f"parameter {i} ({name!r}) of kernel {kernel!r}"
        if t.pointee is not None and t.pointee.name == "(function)":
            raise UnsupportedFeature(f"{where} is a function pointer, which kaas cannot pass",
                                     detail={"kernel": kernel, "param": name, "feature": "parameter type"})
        if t.pointee is not None:
            target = t.pointee
            if target.pointee is not None:
                dtype = ""  # a pointer to pointers: an opaque buffer of addresses
            elif target.name in _POINTEE:
                dtype = _POINTEE[target.name]
            elif target.name.rsplit("::", 1)[-1] in _POINTEE:
                dtype = _POINTEE[target.name.rsplit("::", 1)[-1]]
            else:
                dtype = ""  # a struct: the kernel reads it however it likes
            out.append(Param(name, "buf", "in" if target.const else "inout", dtype))
        elif t.name in _SCALAR:
            out.append(Param(name, _SCALAR[t.name]))
        elif t.name.rsplit("::", 1)[-1] in _TENSOR_MAPS:
            raise UnsupportedFeature(f"{where} is a TMA tensor map (CUtensorMap): kaas cannot encode tensor-map "
                                     "descriptors for a tenant yet", detail={"kernel": kernel, "param": name,
                                                                             "feature": "tma"})
        else:
            raise UnsupportedFeature(
                f"{where} has type {t}, which kaas cannot pass (it passes pointers and "
                "int, unsigned, long, unsigned long, long long, float and double by value)",
                detail={"kernel": kernel, "param": name, "feature": "parameter type", "type": str(t)})
    return tuple(out)


# -- from source -------------------------------------------------------------------------------
_TYPE_WORDS = {"const", "volatile", "unsigned", "signed", "int", "long", "short", "char", "float", "double", "bool",
               "void", "struct", "__restrict__", "__restrict", "restrict", "__grid_constant__", "size_t"}


def declared_names(source: str, kernel: str) -> list[str] | None:
    """The parameter names of ``kernel``'s first plain ``__global__`` declaration in ``source``
    (None when it cannot be read plainly: unnamed or repeated parameters, macros)."""
    from .compiler import code_only

    text = code_only(source.encode()).decode("utf-8", "replace")
    for m in re.finditer(r"\b" + re.escape(kernel) + r"\s*\(", text):  # linear: no backtracking across the file
        before = text[max(0, m.start() - 512):m.start()]
        at = before.rfind("__global__")
        if at < 0 or any(ch in before[at:] for ch in ";{}"):
            continue
        depth, end = 1, m.end()
        while end < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        body = text[m.end():end - 1]
        parts, depth, cur = [], 0, ""
        for ch in body:
            if ch in "(<[":
                depth += 1
            elif ch in ")>]":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur.strip() and cur.strip() != "void":
            parts.append(cur)
        names = []
        for part in parts:
            found = re.findall(r"[A-Za-z_]\w*", part.split("=")[0])
            if len(found) < 2 or found[-1] in _TYPE_WORDS:
                return None  # an unnamed parameter: its last word is its type
            names.append(found[-1])
        return names if len(set(names)) == len(names) else None
    return None


def source_signatures(source: bytes, kernels: Iterable[str], arch: str, options: tuple[str, ...] = (),
                      cache: CompileCache | None = None, names: bool = True) -> dict[str, tuple[Param, ...]]:
    """Each of ``kernels``' parameters, as NVRTC parses ``source`` (one extra compile, no GPU;
    remembered by ``cache`` when given).  ``names=False`` calls them arg0, arg1, ...: a check
    compares types only, and the worker need not read the source's text."""
    from . import compiler

    wanted = list(kernels)
    if not wanted:
        return {}
    exprs = [f"{_PROBE}<decltype({k})>" for k in wanted]
    probe = source + _PROBE_SOURCE.encode()
    lowered = (cache.lowered(probe, exprs, arch, options) if cache is not None
               else compiler.lowered_names(probe, exprs, arch, options))
    text = source.decode("utf-8", "replace") if names else ""
    return {k: kernel_params(k, function_type(low), declared_names(text, k) if names else None)
            for k, low in zip(wanted, lowered, strict=True)}


def derive(source: bytes, entries: Mapping[str, CubinKernel], arch: str, options: tuple[str, ...] = (),
           hosts: Mapping[str, str] | None = None, cache: CompileCache | None = None) -> tuple[KernelSpec, ...]:
    """The signatures of every kernel of a compiled CUDA C library (``entries``: its CUBIN's),
    checked against the binary; ``hosts`` gives host implementations (``module:function``)."""
    plain = sorted(k for k in entries if not k.startswith("_Z"))
    if not plain:
        raise CompileError("the library has no extern \"C\" __global__ kernel (C++ kernels have mangled names: "
                           "declare them extern \"C\")", detail={"log": ""})
    hosts = dict(hosts or {})
    for k in hosts:
        if k not in plain:
            raise SignatureMismatch(f"hosts= names kernel {k!r}; the library has: {', '.join(plain)}",
                                    detail={"kernel": k})
    found = source_signatures(source, plain, arch, options, cache)
    specs = []
    for k in plain:
        spec = KernelSpec(k, found[k], hosts.get(k, ""))
        check_binary(spec, entries[k])
        specs.append(spec)
    return tuple(specs)


# -- checks -----------------------------------------------------------------------------------
def check_library(fmt: str, source: bytes, image: bytes, specs: Iterable[KernelSpec], arch: str,
                  options: tuple[str, ...] = (), cache: CompileCache | None = None, library: str = "") -> None:
    """Refuse declared ``specs`` that disagree with the library: with its CUBIN ``image`` (when it
    is one) by parameter count and sizes and launch features, and for CUDA C with the types the
    source declares."""
    specs = list(specs)
    entries = read_cubin(image) if is_cubin(image) else None
    if entries is not None:
        for spec in specs:
            k = entries.get(spec.name)
            if k is None:
                raise UnknownKernel(
                    f"library {library[:12]} has no kernel {spec.name!r} (it has: {', '.join(sorted(entries))}; "
                    "CUDA C kernels must be declared extern \"C\" to keep their plain names)",
                    detail={"library": library, "kernel": spec.name})
            check_binary(spec, k)
    if fmt == "cuda" and specs:
        try:
            found = source_signatures(source, [s.name for s in specs], arch, options, cache, names=False)
        except (CompileError, UnsupportedFeature):
            found = {}
            for spec in specs:  # one at a time: hold each spec whose types can be read
                try:
                    found.update(source_signatures(source, [spec.name], arch, options, cache, names=False))
                except (CompileError, UnsupportedFeature):
                    # A type this reader cannot decode (an enum, a function pointer, a kernel in a
                    # namespace): that spec is held against the CUBIN's parameter sizes only.
                    continue
        for spec in specs:
            if spec.name in found:
                check_declared(spec, found[spec.name])


def _mismatch(kernel: str, message: str, param: str = "") -> SignatureMismatch:
    detail = {"kernel": kernel}
    if param:
        detail["param"] = param
    return SignatureMismatch(f"kernel {kernel!r}: {message}", detail=detail)


def check_binary(spec: KernelSpec, kernel: CubinKernel) -> None:
    """Refuse ``spec`` where the compiled kernel's parameter table disagrees with it, or where the
    kernel needs a launch feature kaas lacks."""
    feature = kernel.unsupported()
    if feature:
        raise UnsupportedFeature(f"kernel {spec.name!r} needs {feature}, which kaas does not support yet",
                                 detail={"kernel": spec.name, "feature": feature.split(" (")[0]})
    if len(spec.params) != len(kernel.params):
        raise _mismatch(spec.name, f"the compiled kernel takes {len(kernel.params)} parameter(s), "
                                   f"the signature declares {len(spec.params)}")
    for i, (p, raw) in enumerate(zip(spec.params, kernel.params, strict=True)):
        want = _SIZE.get(p.kind)
        if want is not None and want != raw.size:
            raise _mismatch(spec.name, f"parameter {i} ({p.name!r}) is {raw.size} bytes in the binary, declared "
                                       f"{'a buffer (a pointer' if p.kind == 'buf' else p.kind + ' ('}, "
                                       f"{want} bytes)", p.name)


def check_declared(spec: KernelSpec, derived: tuple[Param, ...]) -> None:
    """Refuse a hand-written ``spec`` that disagrees with the source's types (names may differ)."""
    if len(spec.params) != len(derived):
        raise _mismatch(spec.name, f"the source declares {len(derived)} parameter(s), the signature "
                                   f"{len(spec.params)}")
    for i, (p, d) in enumerate(zip(spec.params, derived, strict=True)):
        where = f"parameter {i} ({p.name!r})"
        if (p.kind == "buf") != (d.kind == "buf"):
            raise _mismatch(spec.name, f"{where} is {'a pointer' if d.kind == 'buf' else 'a ' + d.kind + ' scalar'} "
                                       f"in the source, declared {'a buffer' if p.kind == 'buf' else p.kind}", p.name)
        if p.kind != "buf":
            if p.kind != d.kind:
                raise _mismatch(spec.name, f"{where} is {d.kind} in the source, declared {p.kind}", p.name)
            continue
        if p.dtype and d.dtype and p.dtype != d.dtype:
            raise _mismatch(spec.name, f"{where} points to {d.dtype} in the source, declared {p.dtype}", p.name)
        if d.access == "in" and p.access in ("out", "inout"):
            raise _mismatch(spec.name, f"{where} is a const pointer in the source, declared {p.access}: "
                                       "the kernel cannot write through it", p.name)
