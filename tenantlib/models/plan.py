"""A compiled model as data: CUDA C kernels, the buffers they use, and the launches in order. Pure.

A ``ModelPlan`` is what ``tenantlib.models.compile_onnx`` makes of an ONNX model, and what a kaas
client turns into a prepared graph: constants become residents, storages and workspaces temps,
inputs and outputs arena buffers.  It is checked structurally (``check``) before it is used or sent:
names unique, every launch's kernel defined in the source, every argument inside its buffer, launch
dimensions within CUDA's limits.  ``save`` / ``load`` keep it on disk as ``plan.json`` beside the
constants' raw bytes (``constants.bin``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker import errors

__all__ = ["KINDS", "ModelPlan", "PlanArg", "PlanBuffer", "PlanCall", "PlanLaunch", "PlanTensor", "Unsupported"]

KINDS = ("input", "output", "constant", "storage", "workspace")
_MAX_BLOCK = 1024
_MAX_GRID = (2**31 - 1, 65535, 65535)


def Unsupported(message: str) -> errors.UnsupportedFeature:
    """What kaas cannot run in a model (a library call, a dynamic shape, a launch feature)."""
    return errors.UnsupportedFeature(f"model: {message}")


@dataclass(frozen=True)
class PlanBuffer:
    """A root allocation a launch can point into (a tensor of the model lies in one, at an offset)."""

    name: str
    kind: str                # input | output | constant | storage | workspace
    nbytes: int
    dtype: str               # the tensor's for inputs, outputs and constants; uint8 for storages
    shape: tuple[int, ...]
    constant_offset: int = -1  # constants: where its bytes start in ModelPlan.constants


@dataclass(frozen=True)
class PlanArg:
    """A kernel argument: a pointer ``offset`` bytes into ``buffer`` (``nbytes`` of it used), or a scalar."""

    buffer: str = ""
    offset: int = 0
    nbytes: int = 0
    dtype: str = ""          # a scalar's type (int32, int64, float32, ...)
    value: int | float = 0
    param: int = -1          # which parameter of its call's function the pointer is (-1: a workspace)

    @property
    def scalar(self) -> bool:
        return not self.buffer


@dataclass(frozen=True)
class PlanLaunch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int              # dynamic shared memory, bytes
    args: tuple[PlanArg, ...]
    call: int = 0            # the model-level call it belongs to (one call may launch several kernels)


@dataclass(frozen=True)
class PlanTensor:
    buffer: str
    offset: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class PlanCall:
    """A model-level call of a fused function (compiler metadata: its tensors, in its parameters' order)."""

    function: str
    params: tuple[PlanTensor, ...]


@dataclass(frozen=True)
class ModelPlan:
    arch: str
    source: str                          # CUDA C of every kernel (NVRTC-ready)
    buffers: tuple[PlanBuffer, ...]
    launches: tuple[PlanLaunch, ...]
    inputs: tuple[str, ...]              # buffer names, in the model's input order
    outputs: tuple[str, ...]
    constants: bytes = field(default=b"", repr=False)
    compiler: str = ""                   # what made it (e.g. "apache-tvm 0.27.0")
    calls: tuple[PlanCall, ...] = ()     # launches[i].call indexes this
    cached: bool = field(default=False, compare=False)  # loaded from the compile cache

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self._doc(), sort_keys=True).encode())
        h.update(self.constants)
        return h.hexdigest()

    def buffer(self, name: str) -> PlanBuffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise errors.InvalidArgument(f"model plan has no buffer {name!r}")

    def of(self, *kinds: str) -> tuple[PlanBuffer, ...]:
        return tuple(b for b in self.buffers if b.kind in kinds)

    def constant(self, name: str) -> np.ndarray:
        b = self.buffer(name)
        if b.kind != "constant":
            raise errors.InvalidArgument(f"buffer {name!r} is a {b.kind}, not a constant")
        return np.frombuffer(self.constants, dtype=b.dtype, count=math.prod(b.shape),
                             offset=b.constant_offset).reshape(b.shape)

    # -- checks --------------------------------------------------------------------------------
    def check(self) -> ModelPlan:
        """Raise ``InvalidArgument`` naming the first thing wrong with the plan's structure; returns it."""
        def bad(msg: str) -> errors.InvalidArgument:
            return errors.InvalidArgument(f"model plan: {msg}")

        names = [b.name for b in self.buffers]
        if len(set(names)) != len(names):
            raise bad(f"buffer names repeat: {sorted(n for n in names if names.count(n) > 1)[:5]}")
        by_name = {b.name: b for b in self.buffers}
        for b in self.buffers:
            if b.kind not in KINDS:
                raise bad(f"buffer {b.name!r} has kind {b.kind!r}")
            if b.nbytes <= 0:
                raise bad(f"buffer {b.name!r} has {b.nbytes} bytes")
            if b.kind in ("input", "output", "constant") and \
                    math.prod(b.shape) * np.dtype(b.dtype).itemsize != b.nbytes:
                raise bad(f"buffer {b.name!r}: {b.shape} {b.dtype} is not {b.nbytes} bytes")
            if b.kind == "constant" and not 0 <= b.constant_offset <= len(self.constants) - b.nbytes:
                raise bad(f"constant {b.name!r} lies outside the constants ({len(self.constants)} bytes)")
        for n in (*self.inputs, *self.outputs):
            if n not in by_name:
                raise bad(f"input/output {n!r} is not a buffer")
        if [b.name for b in self.of("input")] != list(self.inputs):
            raise bad("the input buffers and the inputs differ")
        defined = set(re.findall(r'extern\s+"C"\s+__global__\s+(?:void\s+)?(?:__launch_bounds__\([^)]*\)\s+)?'
                                 r'(?:void\s+)?(\w+)\s*\(', self.source))
        for i, ln in enumerate(self.launches):
            where = f"launch {i} ({ln.kernel})"
            if ln.kernel not in defined:
                raise bad(f"{where}: the source defines no kernel {ln.kernel!r}")
            if any(d < 1 for d in (*ln.grid, *ln.block)) or math.prod(ln.block) > _MAX_BLOCK or \
                    any(g > m for g, m in zip(ln.grid, _MAX_GRID, strict=True)):
                raise bad(f"{where}: grid {ln.grid} / block {ln.block} out of CUDA's range")
            if ln.shared < 0:
                raise bad(f"{where}: {ln.shared} bytes of shared memory")
            for j, a in enumerate(ln.args):
                if a.scalar:
                    if a.dtype not in ("int32", "int64", "uint32", "uint64", "float32", "float64"):
                        raise bad(f"{where}, argument {j}: scalar of type {a.dtype!r}")
                    continue
                into = by_name.get(a.buffer)
                if into is None:
                    raise bad(f"{where}, argument {j}: no buffer {a.buffer!r}")
                if a.offset < 0 or a.nbytes <= 0 or a.offset + a.nbytes > into.nbytes:
                    raise bad(f"{where}, argument {j}: bytes [{a.offset}, {a.offset + a.nbytes}) lie outside "
                              f"{a.buffer!r} of {into.nbytes} bytes")
            if self.calls:
                if not 0 <= ln.call < len(self.calls):
                    raise bad(f"{where}: call {ln.call} of {len(self.calls)}")
                params = self.calls[ln.call].params
                for j, a in enumerate(ln.args):
                    if a.scalar or a.param < 0:
                        continue
                    t = params[a.param] if a.param < len(params) else None
                    if t is None or (t.buffer, t.offset) != (a.buffer, a.offset):
                        raise bad(f"{where}, argument {j}: not parameter {a.param} of {self.calls[ln.call].function}")
        written = {a.buffer for ln in self.launches for a in ln.args if not a.scalar}
        for n in self.outputs:
            if n not in written:
                raise bad(f"no launch writes output {n!r}")
        return self

    # -- on disk -------------------------------------------------------------------------------
    def _doc(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("constants")
        d.pop("cached")
        return d

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``plan.json`` and ``constants.bin`` into ``directory`` (each atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in (("constants.bin", self.constants), ("plan.json", json.dumps(self._doc()).encode())):
            tmp = out / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, cached: bool = False) -> ModelPlan:
        d = Path(directory)
        try:
            doc = json.loads((d / "plan.json").read_text())
            constants = (d / "constants.bin").read_bytes()
            return cls(arch=doc["arch"], source=doc["source"],
                       buffers=tuple(PlanBuffer(**{**b, "shape": tuple(b["shape"])}) for b in doc["buffers"]),
                       launches=tuple(PlanLaunch(ln["kernel"], tuple(ln["grid"]), tuple(ln["block"]),  # type: ignore[arg-type]
                                                 ln["shared"], tuple(PlanArg(**a) for a in ln["args"]), ln["call"])
                                      for ln in doc["launches"]),
                       inputs=tuple(doc["inputs"]), outputs=tuple(doc["outputs"]), constants=constants,
                       compiler=doc.get("compiler", ""), cached=cached,
                       calls=tuple(PlanCall(c["function"], tuple(PlanTensor(t["buffer"], t["offset"], tuple(t["shape"]),
                                                                            t["dtype"]) for t in c["params"]))
                                   for c in doc.get("calls", ())))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"no readable model plan in {d}: {exc}") from None
