"""Kernel signatures read from the artefact: the demangler, NVRTC's types, the CUBIN reader, the
checks of declared signatures, ``Graph.launch``, and all of it through a CPU broker."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tenantlib
from broker import errors
from broker.protocol import KernelSpec, Param
from broker.streams import signatures
from broker.streams.compiler import compile_cuda, nvrtc_available
from broker.streams.cubin import read_cubin
from tenantlib.kernel_specs import resolve_kernels

needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="NVRTC (nvidia-cuda-nvrtc) is not installed")

_MIXED = rb"""
struct Pair { int a; float b; };
namespace ns { struct T { int x; }; template <class U> struct V { U u; }; }
// a comment with a fake declaration: __global__ void nope(int z)
extern "C" __global__ void __launch_bounds__(128) mixed(
    const float* __restrict__ a, float* b, int n, unsigned u, long l, unsigned long long ull,
    float f, double d, const double* cd, void* v, Pair* pair, ns::T* t, const ns::V<int>* vv, float** pp,
    const int* const ci) {
  __shared__ float tile[64];
  tile[threadIdx.x % 64] = a[0] * f;
  __syncthreads();
  b[threadIdx.x] = tile[(threadIdx.x + 1) % 64] + n + u + l + ull + d + cd[0];
}
extern "C" __global__ void noargs() {}
extern "C" __global__ void axpy(float alpha, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = alpha * x[i] + y[i];
}
"""


@pytest.fixture(scope="module")
def mixed_cubin() -> bytes:
    if not nvrtc_available():
        pytest.skip("NVRTC (nvidia-cuda-nvrtc) is not installed")
    return compile_cuda(_MIXED, "sm_90")[0]


# -- the demangler (pure) ------------------------------------------------------------------------
def test_function_type_reads_pointers_qualifiers_and_substitutions() -> None:
    # void (const float*, const float*, float*, int, double, unsigned long long, Pair, ns::T*, const ns::T*)
    low = "_Z22__kaas_signature_probeIFvPKfS1_Pfidy4PairPN2ns1TEPKS5_EEvv"  # as NVRTC 13.5 writes it
    types = signatures.function_type(low)
    assert [str(t) for t in types] == [
        "const float*", "const float*", "float*", "int", "double", "unsigned long long", "Pair", "ns::T*",
        "const ns::T*"]


def test_function_type_of_no_parameters_and_templates() -> None:
    assert signatures.function_type("_Z22__kaas_signature_probeIFvvEEvv") == []
    types = signatures.function_type("_Z22__kaas_signature_probeIFvPN2ns1VIiEEPKS2_EEvv")
    assert [str(t) for t in types] == ["ns::V<...>*", "const ns::V<...>*"]


@pytest.mark.parametrize("bad", ["_Z3fooIFviEEvv", "_Z22__kaas_signature_probeIFvRiEEvv",
                                 "_Z22__kaas_signature_probeIFvS9_EEvv", "_Z22__kaas_signature_probeIFvP"])
def test_function_type_refuses_what_it_cannot_read(bad: str) -> None:
    with pytest.raises(errors.CompileError):
        signatures.function_type(bad)


@given(st.text(alphabet="_ZFvPKSIiEN0123456789fdxyjlmRVrL", max_size=40))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_function_type_never_fails_otherwise(tail: str) -> None:
    try:
        signatures.function_type("_Z22__kaas_signature_probeI" + tail)
    except errors.CompileError:
        pass


def test_kernel_params_maps_c_types_and_refuses_the_rest() -> None:
    C = signatures.CType
    params = signatures.kernel_params("k", [C(pointee=C("float", const=True)), C(pointee=C("unsigned char")),
                                            C("unsigned int"), C("long"), C("double"), C(pointee=C("Pair"))],
                                      ["a", "b", "n", "m", "d", "p"])
    assert params == (Param("a", "buf", "in", "float32"), Param("b", "buf", "inout", "uint8"),
                      Param("n", "u32"), Param("m", "i64"), Param("d", "f64"), Param("p", "buf", "inout", ""))
    with pytest.raises(errors.UnsupportedFeature, match=r"parameter 0 \('s'\) of kernel 'k' has type short"):
        signatures.kernel_params("k", [C("short")], ["s"])
    with pytest.raises(errors.UnsupportedFeature, match="TMA tensor map"):
        signatures.kernel_params("k", [C("CUtensorMap_st", const=True)], ["tm"])


def test_declared_names_read_plain_declarations() -> None:
    src = _MIXED.decode()
    assert signatures.declared_names(src, "axpy") == ["alpha", "x", "y", "n"]
    assert signatures.declared_names(src, "noargs") == []
    assert signatures.declared_names(src, "mixed")[:3] == ["a", "b", "n"]  # type: ignore[index]
    assert signatures.declared_names(src, "nope") is None  # only inside a comment


# -- NVRTC and the CUBIN ---------------------------------------------------------------------------
@needs_nvrtc
def test_source_signatures_from_nvrtc() -> None:
    found = signatures.source_signatures(_MIXED, ["mixed", "noargs", "axpy"], "sm_90")
    assert found["noargs"] == ()
    assert found["axpy"] == (Param("alpha", "f32"), Param("x", "buf", "in", "float32"),
                             Param("y", "buf", "inout", "float32"), Param("n", "i32"))
    assert found["mixed"] == (
        Param("a", "buf", "in", "float32"), Param("b", "buf", "inout", "float32"), Param("n", "i32"),
        Param("u", "u32"), Param("l", "i64"), Param("ull", "u64"), Param("f", "f32"), Param("d", "f64"),
        Param("cd", "buf", "in", "float64"), Param("v", "buf", "inout", ""), Param("pair", "buf", "inout", ""),
        Param("t", "buf", "inout", ""), Param("vv", "buf", "in", ""), Param("pp", "buf", "inout", ""),
        Param("ci", "buf", "in", "int32"))


def test_read_cubin_gives_the_parameter_table_and_launch_facts(mixed_cubin: bytes) -> None:
    ks = read_cubin(mixed_cubin)
    assert set(ks) == {"mixed", "noargs", "axpy"}
    axpy = ks["axpy"]
    assert [(p.offset, p.size) for p in axpy.params] == [(0, 4), (8, 8), (16, 8), (24, 4)]
    assert axpy.param_bytes == 28 and axpy.static_shared == 0 and not axpy.unsupported()
    mixed = ks["mixed"]
    assert len(mixed.params) == 15 and mixed.static_shared >= 64 * 4  # sm_90 adds 1 KiB it reserves
    assert mixed.max_threads == (128, 1, 1)
    assert ks["noargs"].params == ()


@needs_nvrtc
def test_cluster_kernels_are_named_as_unsupported() -> None:
    cubin = compile_cuda(b'extern "C" __global__ void __cluster_dims__(2, 1, 1) c(float* x) { x[0] = 1; }',
                         "sm_90")[0]
    k = read_cubin(cubin)["c"]
    assert k.cluster == (2, 1, 1)
    with pytest.raises(errors.UnsupportedFeature, match="thread-block clusters"):
        signatures.check_binary(KernelSpec("c", (Param("x", "buf", "out"),)), k)


@pytest.mark.parametrize("cut", [0, 10, 63, 200, 1000])
def test_read_cubin_refuses_truncated_files(mixed_cubin: bytes, cut: int) -> None:
    with pytest.raises(errors.CompileError):
        read_cubin(mixed_cubin[:cut])


@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_read_cubin_on_scribbled_bytes_raises_only_compile_error(mixed_cubin: bytes, data: st.DataObject) -> None:
    raw = bytearray(mixed_cubin)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        read_cubin(bytes(raw))
    except errors.CompileError:
        pass


# -- checks of declared signatures -----------------------------------------------------------------
_AXPY = (Param("alpha", "f32"), Param("x", "buf", "in", "float32"), Param("y", "buf", "inout", "float32"),
         Param("n", "i32"))


@needs_nvrtc
@pytest.mark.parametrize(("params", "message"), [
    (_AXPY[:3], "the signature declares 3"),
    ((Param("alpha", "f64"), *_AXPY[1:]), r"parameter 0 \('alpha'\) is 4 bytes in the binary"),
    ((*_AXPY[:3], Param("n", "u32")), r"parameter 3 \('n'\) is i32 in the source, declared u32"),
    ((Param("alpha", "buf", "in"), *_AXPY[1:]), r"parameter 0 \('alpha'\) is 4 bytes in the binary, declared a buffer"),
    ((_AXPY[0], Param("x", "i64"), *_AXPY[2:]), r"parameter 1 \('x'\) is a pointer in the source, declared i64"),
    ((Param("alpha", "i32"), *_AXPY[1:]), r"parameter 0 \('alpha'\) is f32 in the source, declared i32"),
    ((_AXPY[0], Param("x", "buf", "out", "float32"), *_AXPY[2:]), r"'x'.*const pointer in the source, declared out"),
    ((_AXPY[0], Param("x", "buf", "in", "float64"), *_AXPY[2:]), "points to float32 in the source, declared float64"),
])
def test_check_library_refuses_a_wrong_signature_naming_the_parameter(params: tuple[Param, ...], message: str,
                                                                      mixed_cubin: bytes) -> None:
    with pytest.raises(errors.SignatureMismatch, match=message):
        signatures.check_library("cuda", _MIXED, mixed_cubin, [KernelSpec("axpy", params)], "sm_90")


@needs_nvrtc
def test_check_library_accepts_the_right_one_and_narrowing(mixed_cubin: bytes) -> None:
    narrowed = (_AXPY[0], _AXPY[1], Param("y", "buf", "in", "float32"), _AXPY[3])
    signatures.check_library("cuda", _MIXED, mixed_cubin, [KernelSpec("axpy", _AXPY), KernelSpec("axpy", narrowed)],
                             "sm_90")
    with pytest.raises(errors.UnknownKernel, match="no kernel 'saxpy'"):
        signatures.check_library("cubin", b"", mixed_cubin, [KernelSpec("saxpy", _AXPY)], "sm_90")


# -- the tenant side: resolve_kernels ------------------------------------------------------------------
@needs_nvrtc
def test_resolve_kernels_from_source_with_access_and_hosts() -> None:
    specs = {s.name: s for s in resolve_kernels("cuda", _MIXED, None, access={"axpy": {"y": "out"}},
                                                hosts={"axpy": "tenantlib.kernels.host:axpy"})}
    assert specs["axpy"] == KernelSpec("axpy", (*_AXPY[:2], Param("y", "buf", "out", "float32"), _AXPY[3]),
                                       "tenantlib.kernels.host:axpy")
    assert set(specs) == {"mixed", "noargs", "axpy"}


@needs_nvrtc
@pytest.mark.parametrize(("access", "message"), [
    ({"axpy": {"x": "out"}}, "const pointer"),
    ({"axpy": {"n": "out"}}, "i32 scalar, not a buffer"),
    ({"axpy": {"z": "out"}}, "no parameter 'z'"),
    ({"saxpy": {"y": "out"}}, "names kernel 'saxpy'"),
])
def test_resolve_kernels_refuses_bad_access(access: dict[str, dict[str, str]], message: str) -> None:
    with pytest.raises(errors.SignatureMismatch, match=message):
        resolve_kernels("cuda", _MIXED, None, access=access)


@needs_nvrtc
def test_resolve_kernels_from_c_prototypes_and_binary_hints(mixed_cubin: bytes) -> None:
    specs = resolve_kernels("cubin", mixed_cubin, {"axpy": "float alpha, const float* x, float* y, int n"},
                            access={"axpy": {"y": "inout"}})
    assert specs == (KernelSpec("axpy", _AXPY),)
    with pytest.raises(errors.InvalidArgument, match=r"axpy\(4 bytes, 8 bytes, 8 bytes, 4 bytes\)"):
        resolve_kernels("cubin", mixed_cubin, None)
    with pytest.raises(errors.InvalidArgument, match="plain C parameter list"):
        resolve_kernels("cubin", mixed_cubin, {"axpy": "int n); void evil(int x"})
    with pytest.raises(errors.InvalidArgument, match="put them in the specs"):
        resolve_kernels("cuda", _MIXED, [KernelSpec("axpy", _AXPY)], access={"axpy": {"y": "out"}})


# -- Graph.launch ----------------------------------------------------------------------------------------------
def _lib() -> tenantlib.Library:
    return tenantlib.Library("d" * 64, "t", {"axpy": KernelSpec("axpy", _AXPY),
                                             "vadd": KernelSpec("vadd", (Param("a", "buf", "in", "float32"),
                                                                         Param("c", "buf", "out", "float32"),
                                                                         Param("n", "u64")))})


def test_launch_wraps_arrays_by_access_and_converts_numbers_exactly() -> None:
    lib = _lib()
    g = tenantlib.Graph()
    x, y = np.zeros(4, np.float32), np.zeros(4, np.float32)
    g.launch(lib.axpy, 1, 4, 2, x, y, np.int32(4))
    spec = g.spec(lambda arr: (1, 0))
    assert [b.kind for b in spec.buffers] == ["in", "inout"]
    assert [a.value for a in spec.kernels[0].args if hasattr(a, "value")] == [2.0, 4]
    assert "axpy(f32 alpha, in float32* x, inout float32* y, i32 n)" == lib.axpy.signature()
    with pytest.raises(AttributeError, match="no kernel or attribute 'saxpy'"):
        lib.saxpy  # noqa: B018


@pytest.mark.parametrize(("args", "error", "message"), [
    ((2.0, np.zeros(4, np.float64), np.zeros(4, np.float32), 4), errors.DtypeMismatch, "points to float32, got a float64"),
    ((np.float64(2.0), np.zeros(4, np.float32), np.zeros(4, np.float32), 4), errors.ArgumentError, "numpy float64"),
    ((2.0, np.zeros(4, np.float32), np.zeros(4, np.float32), 2**31), errors.ArgumentError, "outside"),
    ((2.0, np.zeros(4, np.float32), np.zeros(4, np.float32), 4.0), errors.ArgumentError, r"i32; got float"),
    ((2**24 + 1, np.zeros(4, np.float32), np.zeros(4, np.float32), 4), errors.ArgumentError, "not exactly a f32"),
    ((True, np.zeros(4, np.float32), np.zeros(4, np.float32), 4), errors.ArgumentError, "got a bool"),
    ((2.0, 3, np.zeros(4, np.float32), 4), errors.ArgumentError, "must be a buffer"),
    ((2.0, np.zeros(4, np.float32), 4), errors.ArgumentError, "takes 4 argument"),
])
def test_launch_refuses_what_does_not_fit(args: tuple[object, ...], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        tenantlib.Graph().launch(_lib().axpy, 1, 4, *args)


def test_launch_refuses_one_array_as_two_kinds_of_buffer() -> None:
    lib, g = _lib(), tenantlib.Graph()
    x = np.zeros(4, np.float32)
    g.launch(lib.vadd, 1, 4, x, np.zeros(4, np.float32), 4)
    with pytest.raises(errors.ArgumentError, match="already a in buffer"):
        g.launch(lib.vadd, 1, 4, np.zeros(4, np.float32), x, 4)


# -- through a CPU broker ----------------------------------------------------------------------------------------
@needs_nvrtc
def test_a_library_without_kernels_runs_through_the_broker(client: tenantlib.Client) -> None:
    lib = client.library(_MIXED.decode(), access={"axpy": {"y": "inout"}},
                         hosts={"axpy": "tenantlib.kernels.host:axpy", "noargs": "tenantlib.kernels.host:null",
                                "mixed": "tenantlib.kernels.host:null"})
    assert lib["axpy"].params == _AXPY
    rng = np.random.default_rng(7)
    x, y = client.array(1000), client.array(1000)
    x[:], y[:] = rng.random(1000, dtype=np.float32), rng.random(1000, dtype=np.float32)
    want = np.float32(1.5) * x + y
    g = client.graph()
    g.launch(lib.axpy, 4, 256, 1.5, x, y, 1000)
    client.run(g, timeout=30)
    np.testing.assert_array_equal(y, want)


@needs_nvrtc
def test_the_broker_refuses_a_wrong_hand_written_signature(client: tenantlib.Client) -> None:
    wrong = KernelSpec("axpy", (*_AXPY[:3], Param("n", "u32")), host="tenantlib.kernels.host:axpy")
    with pytest.raises(errors.SignatureMismatch, match=r"parameter 3 \('n'\) is i32 in the source, declared u32"):
        client.library(_MIXED.decode(), kernels=[wrong])
    short = KernelSpec("axpy", _AXPY[:3], host="tenantlib.kernels.host:axpy")
    with pytest.raises(errors.SignatureMismatch, match="the signature declares 3"):
        client.library(_MIXED.decode(), kernels=[short])
    with pytest.raises(errors.UnknownKernel, match="no kernel 'saxpy'"):
        client.library(_MIXED.decode(), kernels=[KernelSpec("saxpy", _AXPY, host="tenantlib.kernels.host:axpy")])
    assert client.ping() > 0  # the session goes on


@needs_nvrtc
def test_the_broker_refuses_a_cluster_kernel_and_checks_cubins(client: tenantlib.Client) -> None:
    src = 'extern "C" __global__ void __cluster_dims__(2, 1, 1) c(float* x) { x[0] = 1; }'
    with pytest.raises(errors.UnsupportedFeature, match="thread-block clusters"):
        client.library(src, kernels=[KernelSpec("c", (Param("x", "buf", "out"),), host="tenantlib.kernels.host:null")])
    cubin = compile_cuda(_MIXED, "sm_90")[0]
    wrong = KernelSpec("axpy", (Param("alpha", "f64"), *_AXPY[1:]), host="tenantlib.kernels.host:axpy")
    with pytest.raises(errors.SignatureMismatch, match="4 bytes in the binary"):
        client.library(cubin, kernels=[wrong])


def test_cubin_reader_struct_layout_is_what_the_elf_spec_says() -> None:
    k = read_cubin(_elf_with_one_kernel(b"k"))["k"]  # a minimal hand-built CUDA ELF (below)
    assert [(p.ordinal, p.offset, p.size) for p in k.params] == [(0, 0, 8)]


# -- regressions from review: hostile or unusual input ---------------------------------------------
@pytest.mark.parametrize("src", [
    b'#include "/etc/passwd"\n', b"  #  include <x>\n", b'%:include "a"\n', b'#\\\ninclude "a"\n',
    b'#if __has_include("/etc/x")\n#endif\n', b'/**/ #include "a"\n', b'#/**/include "a"\n',
    b'const char* s = "/*";\n#include "/etc/passwd"\n// */\n', b'auto s = R"(")";\n#include "/etc/passwd" // "\n',
])
def test_tenant_source_may_not_include_files(src: bytes) -> None:
    from broker.streams.compiler import refuse_includes

    with pytest.raises(errors.CompileError, match="may not include files"):
        refuse_includes(src)


def test_include_text_in_comments_and_literals_is_fine() -> None:
    from broker.streams.compiler import refuse_includes

    refuse_includes(b'// #include <x>\n/* #include "a" */\nconst char* s = "#include <y>";\nauto r = R"d(#include "z")d";\n')


def test_the_broker_refuses_an_include(client: tenantlib.Client) -> None:
    with pytest.raises(errors.CompileError, match="may not include files"):
        client.library('#include "/etc/passwd"\nextern "C" __global__ void null() {}\n',
                       kernels=[KernelSpec("null", (), host="tenantlib.kernels.host:null")])


_UNUSUAL = rb"""
template <class T> struct F { T x; };
template <int N> struct W {};
template <class T> struct V {};
enum E { A, B };
extern "C" __global__ void subst(F<int>* a, F<float>* b, V<W<3>>* c, V<int>* d) {}
extern "C" __global__ void fnptr(void (*fp)(int), int n) {}
extern "C" __global__ void with_enum(E e, int n) {}
extern "C" __global__ void unnamed(const float*, int) {}
"""


@needs_nvrtc
def test_unusual_types_are_read_or_named() -> None:
    found = signatures.source_signatures(_UNUSUAL, ["subst", "unnamed"], "sm_90")
    assert [p.kind for p in found["subst"]] == ["buf"] * 4  # a substituted template name with its arguments
    assert [p.name for p in found["unnamed"]] == ["arg0", "arg1"]
    with pytest.raises(errors.UnsupportedFeature, match="function pointer"):
        signatures.source_signatures(_UNUSUAL, ["fnptr"], "sm_90")
    with pytest.raises(errors.UnsupportedFeature, match="has type E"):
        signatures.source_signatures(_UNUSUAL, ["with_enum"], "sm_90")


@needs_nvrtc
def test_hand_written_specs_of_types_the_reader_cannot_decode_are_held_to_the_binary() -> None:
    cubin = compile_cuda(_UNUSUAL, "sm_90")[0]
    ok = [KernelSpec("with_enum", (Param("e", "i32"), Param("n", "i32"))),
          KernelSpec("fnptr", (Param("fp", "u64"), Param("n", "i32")))]
    signatures.check_library("cuda", _UNUSUAL, cubin, ok, "sm_90")
    with pytest.raises(errors.SignatureMismatch, match="is 4 bytes in the binary"):
        signatures.check_library("cuda", _UNUSUAL, cubin, [KernelSpec("with_enum", (Param("e", "i64"),
                                                                                     Param("n", "i32")))], "sm_90")


@pytest.mark.parametrize("bad", [
    "_Z22__kaas_signature_probeIFvS-5_EEvv", "_Z22__kaas_signature_probeIFvStEEvv",
    "_Z22__kaas_signature_probeIFviEEvvXX", "_Z22__kaas_signature_probeIFv" + "P" * 2000 + "iEEvv",
    "_Z22__kaas_signature_probeIFv1VIL_ZN1a1bEEEEEvv",
])
def test_function_type_refuses_malformed_and_deep_names(bad: str) -> None:
    with pytest.raises(errors.CompileError):
        signatures.function_type(bad)


def test_declared_names_fall_back_when_parameters_are_unnamed_or_repeated() -> None:
    assert signatures.declared_names("__global__ void k(const float*, int) {}", "k") is None
    assert signatures.declared_names("__global__ void k(float* a, float* a) {}", "k") is None
    assert signatures.declared_names('const char* s = "__global__ void k(int z)"; __global__ void k(int n) {}',
                                     "k") == ["n"]


def test_launch_refuses_numbers_out_of_a_float_range() -> None:
    lib = tenantlib.Library("d" * 64, "t", {"f": KernelSpec("f", (Param("x", "f32"), Param("y", "f64")))})
    with pytest.raises(errors.ArgumentError, match="out of its range"):
        tenantlib.Graph().launch(lib.f, 1, 1, 1e300, 1.0)
    with pytest.raises(errors.ArgumentError, match="out of its range"):
        tenantlib.Graph().launch(lib.f, 1, 1, 1.0, 2**2000)
    tenantlib.Graph().launch(lib.f, 1, 1, float("inf"), 1e300)


def _elf_with_one_kernel(name: bytes) -> bytes:
    info = struct.pack("<BBH", 4, 0x17, 12) + struct.pack("<IHHI", 0, 0, 0, 8 << 18)
    names = b"\0.shstrtab\0.strtab\0.symtab\0.nv.info." + name + b"\0"
    strtab = b"\0" + name + b"\0"
    sym = bytes(24) + struct.pack("<IBBHQQ", 1, 0x12, 0x10, 0, 0, 0)
    body = [names, strtab, sym, info]
    offs, at = [], 64
    for part in body:
        offs.append(at)
        at += len(part)
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<H", hdr, 18, 190)
    struct.pack_into("<Q", hdr, 0x28, at)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 5, 1)
    sh = bytes(64)
    sh += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, offs[0], len(names), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 11, 3, 0, 0, offs[1], len(strtab), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 19, 2, 0, 0, offs[2], len(sym), 2, 1, 8, 24)
    sh += struct.pack("<IIQQQQIIQQ", 27, 0x70000000, 0, 0, offs[3], len(info), 3, 0, 4, 0)
    return bytes(hdr) + b"".join(body) + sh


def test_cubin_reader_refuses_oversized_names() -> None:
    assert list(read_cubin(_elf_with_one_kernel(b"k" * 100))) == ["k" * 100]
    with pytest.raises(errors.CompileError, match="not terminated within"):
        read_cubin(_elf_with_one_kernel(b"k" * 5000))
