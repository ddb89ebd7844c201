"""tenantlib.models: deep-learning models as kaas kernel graphs (extra ``kaas[models]``).

    plan = compile_onnx(onnx_model, arch=client.arch)   # -> ModelPlan, cached on disk by content

``compile_onnx`` runs Apache TVM (``tenantlib.models.tvm_export``) on an ONNX model and returns a
``ModelPlan``: the CUDA C of the fused kernels, the model's buffers (inputs, outputs, constants,
storages and workspaces with their sizes), and the kernel launches in order with each argument's
buffer and offset.  The batch and every shape are fixed at compile time (``input_shapes`` fixes
dynamic ones).  What kaas cannot run (a library call, a dynamic shape, a launch feature it lacks) is
an ``UnsupportedFeature`` naming it, here and not when the model runs.  The plan is checked
structurally before it is returned (``ModelPlan.check``).

Compiles take seconds to a minute (ResNet-50: ~30 s); each step is reported to ``progress``
(default: a line on stderr) and the result kept in ``cache_dir`` (default
``$KAAS_MODEL_CACHE``, else ``~/.cache/kaas/models``) under a digest of the model's bytes, the
shapes, the arch and the compiler version, so the same model compiles once.

``replay_on_cpu`` runs a plan's calls in order on the CPU with TVM's own functions built for LLVM:
a check of the plan against the model (onnxruntime's answer) on a machine without a GPU.

Running a plan through a broker (``client.model(plan)``: constants as residents shared between
tenants, storages as temps, one prepared graph) is not built yet.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker import errors

from .plan import ModelPlan, PlanArg, PlanBuffer, PlanCall, PlanLaunch, PlanTensor

__all__ = ["ModelPlan", "PlanArg", "PlanBuffer", "PlanCall", "PlanLaunch", "PlanTensor", "compile_onnx",
           "replay_on_cpu"]


def _need() -> tuple[Any, Any]:
    try:
        import onnx
        import tvm
    except ImportError as exc:
        raise errors.InvalidArgument(f"tenantlib.models needs Apache TVM and onnx (pip install 'kaas[models]'): "
                                     f"{exc}") from None
    return onnx, tvm


def _model_bytes(model: Any) -> tuple[Any, bytes]:
    onnx, _ = _need()
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    if not isinstance(model, onnx.ModelProto):
        raise errors.InvalidArgument(f"a model is an onnx.ModelProto, its bytes or a path, not {type(model).__name__}")
    return model, model.SerializeToString()


def _stderr(msg: str) -> None:
    print(f"kaas models: {msg}", file=sys.stderr, flush=True)


def _arch(arch: str) -> str:
    a = arch.strip().lower()
    if a.startswith("sm") and a[2:].lstrip("_").isdigit():
        return "sm_" + a[2:].lstrip("_")
    raise errors.InvalidArgument(f"arch {arch!r} is not of the form sm_XY (Client.arch gives the device's)")


def compile_onnx(model: Any, input_shapes: Mapping[str, Sequence[int]] | None = None, arch: str = "sm_90", *,
                 cache_dir: str | os.PathLike[str] | None = None,
                 progress: Callable[[str], None] | None = _stderr) -> ModelPlan:
    """The ``ModelPlan`` of an ONNX ``model`` (a ModelProto, its bytes, or a path) for ``arch``."""
    _, tvm = _need()
    model, data = _model_bytes(model)
    arch = _arch(arch)
    shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    key = hashlib.sha256(data + repr((sorted(shapes.items()), arch, tvm.__version__)).encode()).hexdigest()
    root = Path(cache_dir or os.environ.get("KAAS_MODEL_CACHE") or Path.home() / ".cache" / "kaas" / "models")
    where = root / key[:32]
    say = progress or (lambda _: None)
    if (where / "plan.json").exists():
        try:
            plan = ModelPlan.load(where, cached=True).check()
            say(f"{plan.compiler} plan from the cache ({len(plan.launches)} launches)")
            return plan
        except errors.InvalidArgument:
            pass  # unreadable or stale: compiled again below
    from .tvm_export import compile_with_tvm

    t0 = time.monotonic()

    def step(msg: str) -> None:
        say(f"{msg} ({time.monotonic() - t0:.1f} s)")

    plan = compile_with_tvm(model, shapes or None, arch, step)
    step(f"done: {len(plan.launches)} launches of {len({ln.kernel for ln in plan.launches})} kernels, "
         f"{len(plan.of('storage', 'workspace'))} storages, {len(plan.of('constant'))} constants "
         f"({len(plan.constants) / 2**20:.1f} MiB)")
    try:
        plan.save(where)
    except OSError as exc:  # a read-only home: the plan is still good, just not kept
        say(f"not cached ({exc})")
    return plan


def replay_on_cpu(model: Any, plan: ModelPlan, inputs: Mapping[str, np.ndarray],
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The plan's outputs for ``inputs`` (by input buffer name), computed on the CPU (see the module)."""
    from .tvm_export import replay_with_tvm

    model, _ = _model_bytes(model)
    missing = set(plan.inputs) - set(inputs)
    if missing:
        raise errors.InvalidArgument(f"inputs missing: {sorted(missing)}")
    return replay_with_tvm(model, plan, input_shapes, inputs)
