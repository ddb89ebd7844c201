"""tenantlib.models on a machine without a GPU: ONNX models (built here with onnx.helper and seeded
weights, no downloads) compiled by TVM into plans, the plans checked structurally, and a CPU replay
of each plan's calls compared with onnxruntime."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tenantlib import errors

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tvm", "onnx", "onnxruntime")),
    reason="Apache TVM, onnx and onnxruntime are not installed (pip install 'kaas[models]' onnxruntime)")


def _conv_net(seed: int = 0) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((8, 3, 3, 3)) * 0.2, "B1": rng.standard_normal(8) * 0.1,
         "W2": rng.standard_normal((8, 8, 3, 3)) * 0.2, "B2": rng.standard_normal(8) * 0.1,
         "Wg": rng.standard_normal((10, 8)) * 0.3, "Bg": rng.standard_normal(10) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a"]),  # a residual connection
             helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "Wg", "Bg"], ["y"], transB=1)]
    return _model(nodes, w, [("x", [2, 3, 16, 16])], [("y", [2, 10])], TensorProto, helper, numpy_helper)


def _resnetish(seed: int = 0, c: int = 16) -> Any:
    """A small ResNet: a conv-BN-ReLU stem, max pooling, two bottleneck blocks with BatchNorm and
    residual adds, global pooling and a classifier (BN folding and storage reuse both happen)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w: dict[str, Any] = {}
    nodes: list[Any] = []

    def conv_bn(x: str, cin: int, cout: int, k: int, name: str) -> str:
        w[name + "_w"] = rng.standard_normal((cout, cin, k, k)) * (2.0 / (cin * k * k)) ** 0.5
        nodes.append(helper.make_node("Conv", [x, name + "_w"], [name], kernel_shape=[k, k], pads=[k // 2] * 4))
        w[name + "_g"], w[name + "_b"] = 1 + 0.1 * rng.standard_normal(cout), 0.1 * rng.standard_normal(cout)
        w[name + "_m"], w[name + "_v"] = 0.1 * rng.standard_normal(cout), 1 + 0.1 * rng.random(cout)
        nodes.append(helper.make_node("BatchNormalization", [name] + [name + s for s in ("_g", "_b", "_m", "_v")],
                                      [name + "_bn"], epsilon=1e-5))
        return name + "_bn"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [x + "_r"]))
        return x + "_r"

    x = relu(conv_bn("x", 3, c, 3, "stem"))
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[2, 2], strides=[2, 2]))
    x = "pool"
    for i in range(2):
        y = relu(conv_bn(x, c, c // 2, 1, f"b{i}a"))
        y = conv_bn(relu(conv_bn(y, c // 2, c // 2, 3, f"b{i}b")), c // 2, c, 1, f"b{i}c")
        nodes.append(helper.make_node("Add", [y, x], [f"b{i}_add"]))
        x = relu(f"b{i}_add")
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"], axis=1)]
    w["fc_w"], w["fc_b"] = rng.standard_normal((10, c)) * 0.3, rng.standard_normal(10) * 0.1
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1))
    return _model(nodes, w, [("x", [2, 3, 32, 32])], [("y", [2, 10])], TensorProto, helper, numpy_helper)


def _encoder(seed: int = 0, seq: int = 16, hidden: int = 32, dims: Any = None) -> Any:
    """One BERT-like encoder step: self-attention (one head), residual, LayerNorm, a ReLU MLP."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h = hidden
    w = {k: rng.standard_normal(s) * 0.2 for k, s in
         (("Wq", (h, h)), ("Wk", (h, h)), ("Wv", (h, h)), ("W1", (h, 2 * h)), ("W2", (2 * h, h)),
          ("g", (h,)), ("b", (h,)))}
    w["scale"] = np.array(1.0 / np.sqrt(h))
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["att"]),
             helper.make_node("Add", ["att", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W1"], ["m1"]), helper.make_node("Relu", ["m1"], ["m2"]),
             helper.make_node("MatMul", ["m2", "W2"], ["y"])]
    shape = dims or [1, seq, h]
    return _model(nodes, w, [("x", shape)], [("y", shape)], TensorProto, helper, numpy_helper)


def _model(nodes: list[Any], weights: dict[str, Any], ins: list[Any], outs: list[Any], TensorProto: Any,
           helper: Any, numpy_helper: Any) -> Any:
    import onnx

    inits = [numpy_helper.from_array(np.asarray(a, dtype=np.float32), n) for n, a in weights.items()]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in ins],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _reference(m: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return list(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds))


@pytest.mark.parametrize("build, shape", [(_conv_net, (2, 3, 16, 16)), (_encoder, (1, 16, 32)),
                                          (_resnetish, (2, 3, 32, 32))], ids=["conv-net", "encoder", "resnet-ish"])
def test_a_compiled_plan_replays_to_onnxruntimes_answer(build: Any, shape: tuple[int, ...], tmp_path: Path) -> None:
    from tenantlib import models

    m = build()
    lines: list[str] = []
    plan = models.compile_onnx(m, arch="sm_90", cache_dir=tmp_path, progress=lines.append)
    assert lines and lines[-1].startswith("done:")  # it said what it was doing
    assert plan.arch == "sm_90" and plan.inputs == ("x",) and plan.outputs == ("y",)
    assert plan.launches and all(f" {ln.kernel}(" in plan.source for ln in plan.launches)
    assert plan.of("constant") and plan.buffer("y").shape == tuple(_reference_shape(m))
    consts = {b.name: plan.constant(b.name) for b in plan.of("constant")}
    assert sum(a.nbytes for a in consts.values()) > 0
    if build is _resnetish:  # BatchNorm folded into the convolutions; intermediates share storages
        assert len(plan.calls) == len(plan.launches) == 10 and len(plan.of("storage")) < len(plan.calls)
    from broker.streams import compiler

    if compiler.nvrtc_available():  # what a broker compiles: no includes, every launched kernel in the CUBIN
        from broker.streams.cubin import read_cubin

        compiler.refuse_includes(plan.source.encode())
        cubin, _ = compiler.compile_cuda(plan.source.encode(), "sm_90")
        assert {ln.kernel for ln in plan.launches} <= set(read_cubin(cubin))
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    want = _reference(m, {"x": x})[0]
    got = models.replay_on_cpu(m, plan, {"x": x})["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Compiled once: the second call is the cache's (the same plan).
    again = models.compile_onnx(m, arch="sm_90", cache_dir=tmp_path, progress=None)
    assert again.cached and again.digest == plan.digest


def _reference_shape(m: Any) -> list[int]:
    return [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]


def test_a_dynamic_shape_is_refused_at_compile_time_unless_fixed(tmp_path: Path) -> None:
    from tenantlib import models

    m = _encoder(dims=["batch", 16, 32])
    with pytest.raises(errors.UnsupportedFeature, match="input shapes"):
        models.compile_onnx(m, cache_dir=tmp_path, progress=None)
    plan = models.compile_onnx(m, input_shapes={"x": (2, 16, 32)}, cache_dir=tmp_path, progress=None)
    assert plan.buffer("x").shape == (2, 16, 32)
    with pytest.raises(errors.InvalidArgument, match="sm_XY"):
        models.compile_onnx(m, arch="hopper", cache_dir=tmp_path, progress=None)


def test_the_structural_check_names_what_is_wrong(tmp_path: Path) -> None:
    from tenantlib import models
    from tenantlib.models.plan import PlanArg

    plan = models.compile_onnx(_conv_net(), cache_dir=tmp_path, progress=None)
    ln = plan.launches[0]
    arg = next(a for a in ln.args if not a.scalar)
    cases = {
        "lie outside": PlanArg(arg.buffer, plan.buffer(arg.buffer).nbytes, arg.nbytes, param=arg.param),
        "no buffer": PlanArg("nowhere", 0, 4, param=-1),
    }
    for message, bad in cases.items():
        broken = dataclasses.replace(plan, launches=(dataclasses.replace(ln, args=(bad, *ln.args[1:])),
                                                     *plan.launches[1:]))
        with pytest.raises(errors.InvalidArgument, match=message):
            broken.check()
    with pytest.raises(errors.InvalidArgument, match="defines no kernel"):
        dataclasses.replace(plan, launches=(dataclasses.replace(ln, kernel="nonexistent"), *plan.launches[1:])).check()
    with pytest.raises(errors.InvalidArgument, match="out of CUDA's range"):
        dataclasses.replace(plan, launches=(dataclasses.replace(ln, block=(2048, 1, 1)), *plan.launches[1:])).check()
    saved = plan.save(tmp_path / "copy")
    assert models.ModelPlan.load(saved) == plan  # what is saved is what loads
    (saved / "plan.json").write_text("{")
    with pytest.raises(errors.InvalidArgument, match="no readable model plan"):
        models.ModelPlan.load(saved)


def test_generated_source_that_needs_headers_is_refused() -> None:
    from tenantlib.models.tvm_export import kaas_source

    ok = kaas_source('#ifdef __CUDACC_RTC__\n#include <cuda/std/cstdint>\n#else\n#include <cstdint>\n#endif\n'
                     'extern "C" __global__ void k(int64_t* x) { x[0] = 1; }\n')
    assert "#include <" not in ok and "typedef long long int64_t;" in ok
    with pytest.raises(errors.UnsupportedFeature, match="headers"):
        kaas_source('#include <cuda_fp16.h>\nextern "C" __global__ void k(half* x) {}\n')
    with pytest.raises(errors.UnsupportedFeature, match="std::"):
        kaas_source('extern "C" __global__ void k(float* x) { x[0] = std::numeric_limits<float>::max(); }\n')
