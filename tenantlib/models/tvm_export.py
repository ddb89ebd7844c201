"""ONNX -> Apache TVM (0.27) -> a ``ModelPlan``: the CUDA C of the fused kernels and their launches.

The plan comes from two levels of TVM's output:

- the final Relax ``main``: the storages it allocates (with sizes), the tensors it places in them,
  the constants, and the calls of TIR functions in order (a reshape is a view, not a copy);
- each called function's host side after ``SplitHostDevice``: its ``call_ffi_kernel`` launches with
  grid / block / dynamic shared memory, interpreted for the model's concrete shapes (host loops,
  lets and conditions included), and the device functions' parameter lists.  A kernel's arguments
  come in the device function's order, not the TIR function's: they are matched by the buffers'
  pointer identity.

Anything else (a packed library call, a dynamic shape, a launch feature kaas does not have) is an
``UnsupportedFeature`` naming it, here at compile time, never when the model runs.  TVM is imported
only by this module (``pip install 'kaas[models]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .plan import ModelPlan, PlanArg, PlanBuffer, PlanCall, PlanLaunch, PlanTensor, Unsupported

__all__ = ["compile_with_tvm", "cuda_target", "replay_with_tvm"]

_IGNORED_PACKED = {"vm.builtin.check_tensor_info", "vm.builtin.match_shape"}
_VIEW_PACKED = {"vm.builtin.reshape"}  # zero-copy: the result is a view of its argument
_LAUNCH_TAGS = {"blockIdx.x": ("grid", 0), "blockIdx.y": ("grid", 1), "blockIdx.z": ("grid", 2),
                "threadIdx.x": ("block", 0), "threadIdx.y": ("block", 1), "threadIdx.z": ("block", 2)}
_ALIGN = 256  # constants' alignment in the blob (a device allocation's)


# TVM's CUDA preamble takes its fixed-width integers (and some type traits its kernels do not use)
# from CCCL headers under NVRTC; a broker compiles no source that includes files, so the block is
# replaced by this, and any other include or use of std:: is refused (fp16 kernels want cuda_fp16.h).
_RTC_PREAMBLE = """// kaas: in place of TVM's includes of cuda/std/cstdint and cuda/std/type_traits
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#ifndef __asm__
#define __asm__ asm
#endif
#ifndef __volatile__
#define __volatile__ volatile
#endif
"""


def kaas_source(source: str) -> str:
    """TVM's generated CUDA C, made compilable by a broker: no includes (see ``_RTC_PREAMBLE``)."""
    start = source.find("#ifdef __CUDACC_RTC__")
    if start >= 0:
        alt = source.find("\n#else", start)
        end = source.find("\n#endif", alt if alt >= 0 else start)
        if alt < 0 or end < 0:
            raise Unsupported("TVM's CUDA preamble has an unexpected form")
        source = source[:start] + _RTC_PREAMBLE + source[end + len("\n#endif"):]
    from broker.streams.compiler import CompileError, refuse_includes

    try:
        refuse_includes(source.encode())
    except CompileError as exc:
        raise Unsupported(f"the generated CUDA C needs headers a broker does not compile with ({exc.message})") from None
    if "std::" in source:
        raise Unsupported("the generated CUDA C uses the C++ standard library (std::)")
    return source


def cuda_target(arch: str) -> Any:
    import tvm

    # The dict form: 0.27 refuses the string one, and without "arch" it falls back to sm_50.
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 49152, "thread_warp_size": 32})


def _import(model: Any, shapes: Mapping[str, Sequence[int]] | None) -> Any:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()} if shapes else None,
                    keep_params_in_input=False)
    # Without CanonicalizeBindings ResNet-50 becomes 105 launches instead of 56.
    return tvm.transform.Sequential([relax.transform.FoldBatchnormToConv2D(),
                                     relax.transform.DecomposeOpsForInference(),
                                     relax.transform.CanonicalizeBindings()])(mod)


def _int(e: Any) -> int:
    if isinstance(e, int):
        return e
    if hasattr(e, "value") and isinstance(e.value, int):
        return int(e.value)
    raise Unsupported(f"a shape or size that is not a constant ({e}): give the model's input shapes")


def _shape(expr: Any) -> tuple[int, ...]:
    return tuple(_int(v) for v in expr.values)


def _tensor_type(var: Any) -> tuple[tuple[int, ...], str]:
    ty = var.ty
    if getattr(ty, "shape", None) is None:
        raise Unsupported(f"{var.name} has no static shape: give the model's input shapes")
    return tuple(_int(s) for s in ty.shape), str(ty.dtype)


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    import tvm

    t = tvm.DataType(dtype)
    return int(np.prod(shape, dtype=np.int64)) * t.bits // 8 * t.lanes


_BIN: dict[str, Callable[[int, int], int]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: int(a / b), "Mod": lambda a, b: int(np.fmod(a, b)),  # C's truncating division
    "Min": min, "Max": max, "LT": lambda a, b: int(a < b), "LE": lambda a, b: int(a <= b),
    "GT": lambda a, b: int(a > b), "GE": lambda a, b: int(a >= b), "EQ": lambda a, b: int(a == b),
    "NE": lambda a, b: int(a != b), "And": lambda a, b: int(bool(a) and bool(b)),
    "Or": lambda a, b: int(bool(a) or bool(b))}


def _eval(e: Any, env: dict[Any, int]) -> int:
    """A host-side integer expression with every variable bound."""
    from tvm import tirx

    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        if e in env:
            return env[e]
        raise Unsupported(f"host variable {e} has no value (a dynamic shape?)")
    k = type(e).__name__
    if k in _BIN:
        return int(_BIN[k](_eval(e.a, env), _eval(e.b, env)))
    if k == "Cast":
        v, dt = _eval(e.value, env), str(e.ty.dtype)
        bits = int(dt[3:] or 32) if dt.startswith("int") else 64
        return (v + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1)) if dt.startswith("int") and bits < 64 else v
    if k == "Not":
        return int(not _eval(e.a, env))
    if k == "Select":
        return _eval(e.true_value if _eval(e.condition, env) else e.false_value, env)
    raise Unsupported(f"host expression {k} ({e})")


def _launches(hf: Any, dev: Mapping[str, Any], shapes: Sequence[tuple[int, ...]],
              workspace: Callable[[str, int], str]) -> list[tuple[str, tuple[int, int, int], tuple[int, int, int], int,
                                                                 list[Any]]]:
    """Interpret a host function (after SplitHostDevice) for these argument shapes: its launches as
    (kernel, grid, block, shared, args), an argument being ("param", i), ("workspace", name) or
    ("scalar", dtype, value)."""
    import tvm
    from tvm import tirx

    env: dict[Any, int] = {}
    bufs: dict[Any, tuple[str, Any]] = {}
    for i, (p, shp) in enumerate(zip(hf.params, shapes, strict=True)):
        bufs[p] = ("param", i)
        for se, v in zip(p.shape, shp, strict=True):
            if isinstance(se, tirx.Var):
                env.setdefault(se, v)
            elif _eval(se, env) != v:
                raise Unsupported(f"parameter {p.name} is {list(p.shape)}, the call passes {list(shp)}")
        if isinstance(p.elem_offset, tirx.Var):
            env[p.elem_offset] = 0  # the plan passes the tensor's own address
        if p.strides and len(p.strides):
            raise Unsupported(f"strided parameter {p.name}")
    out: list[tuple[str, tuple[int, int, int], tuple[int, int, int], int, list[Any]]] = []

    def ptr(e: Any) -> tuple[str, Any]:
        if isinstance(e, tvm.ir.Call) and e.op.name == "tirx.buffer_data":
            for k, v in bufs.items():
                if k.same_as(e.args[0]):
                    return v
        raise Unsupported(f"kernel pointer argument {e}")

    def launch(c: Any) -> None:
        name = str(c.args[0].value)
        tags = [str(x) for x in c.attrs.launch_params]
        kf = dev[name]
        n = len(kf.params)
        grid, block, shared = [1, 1, 1], [1, 1, 1], 0
        for tag, v in zip(tags, list(c.args[1 + n:]), strict=True):
            if tag in _LAUNCH_TAGS:
                which, axis = _LAUNCH_TAGS[tag]
                (grid if which == "grid" else block)[axis] = _eval(v, env)
            elif tag == "tirx.use_dyn_shared_memory":
                shared = _eval(v, env)
            else:
                raise Unsupported(f"kernel {name} asks for launch feature {tag!r}")
        args: list[Any] = []
        for kp, a in zip(kf.params, list(c.args[1:1 + n]), strict=True):
            if isinstance(kp.ty, tvm.ir.PointerType):
                args.append(ptr(a))
            else:
                args.append(("scalar", str(kp.ty.dtype), _eval(a, env)))
        out.append((name, (grid[0], grid[1], grid[2]), (block[0], block[1], block[2]), shared, args))

    def visit(s: Any) -> None:
        if isinstance(s, tirx.SeqStmt):
            for c in s.seq:
                visit(c)
        elif isinstance(s, tirx.DeclBuffer):
            if s.buffer.elem_offset is not None and _eval(s.buffer.elem_offset, env) != 0:
                raise Unsupported(f"a buffer declared at an element offset ({s.buffer.name})")
            bufs[s.buffer] = ptr(s.data)  # s.data, not s.buffer.data: that one points back at itself
        elif isinstance(s, tirx.AllocBuffer):
            b = s.buffer
            count = 1
            for d in b.shape:
                count *= _eval(d, env)
            bufs[b] = ("workspace", workspace(str(b.name), count * tvm.DataType(str(b.dtype)).bits // 8))
        elif isinstance(s, tirx.Bind):
            env[s.var] = _eval(s.value, env)
        elif isinstance(s, tirx.For):
            if int(s.kind) != 0:
                raise Unsupported(f"a host loop of kind {s.kind}")
            lo, ext = _eval(s.min, env), _eval(s.extent, env)
            step = 1 if getattr(s, "step", None) is None else _eval(s.step, env)
            for i in range(lo, lo + ext, step):
                env[s.loop_var] = i
                visit(s.body)
        elif isinstance(s, tirx.IfThenElse):
            if _eval(s.condition, env):
                visit(s.then_case)
            elif s.else_case is not None:
                visit(s.else_case)
        elif isinstance(s, tirx.AttrStmt):
            visit(s.body)
        elif isinstance(s, tirx.Evaluate) and isinstance(s.value, tvm.ir.Call) \
                and s.value.op.name == "tirx.call_ffi_kernel":
            launch(s.value)
        elif isinstance(s, tirx.Evaluate) and isinstance(s.value, tirx.IntImm):
            pass
        else:
            raise Unsupported(f"host-side statement {type(s).__name__} in {hf}")

    visit(hf.body)
    return out


def compile_with_tvm(model: Any, shapes: Mapping[str, Sequence[int]] | None, arch: str,
                     progress: Callable[[str], None]) -> ModelPlan:
    """The plan of ``model`` (an ``onnx.ModelProto``) for ``arch`` (``sm_90``)."""
    import tvm
    from tvm import relax, tirx

    target = cuda_target(arch)
    progress("importing the ONNX model")
    mod = _import(model, shapes)
    progress(f"compiling for {arch} (fusion, GPU schedules, memory planning)")
    with target:
        mod = relax.get_default_pipeline(target)(mod)
    tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)})
    split: dict[str, Any] = {}

    @tvm.instrument.pass_instrument
    class _AfterSplit:
        def run_after_pass(self, m: Any, info: Any) -> None:
            if info.name == "tirx.SplitHostDevice":
                split["mod"] = m

    progress(f"generating CUDA C for {len(tir.functions)} fused functions")
    with tvm.transform.PassContext(opt_level=3, instruments=[_AfterSplit()]):
        lib = tvm.tirx.build(tir, target=target.with_host("llvm"))
    cuda = [m for m in lib.imports if m.kind == "cuda"]
    if len(cuda) != 1:
        raise Unsupported(f"TVM built {len(cuda)} CUDA modules (kinds: {[m.kind for m in lib.imports]})")
    source = kaas_source(cuda[0].inspect_source("cuda"))
    funcs = split["mod"].functions.items()
    dev = {gv.name_hint: f for gv, f in funcs if f.attrs.get("calling_conv", 0) == 2}
    host = {gv.name_hint: f for gv, f in funcs if f.attrs.get("calling_conv", 0) != 2}
    progress("extracting the launch plan")
    plan = _plan(mod["main"], host, dev, source, arch, f"apache-tvm {tvm.__version__}")
    names = [o.name for o in model.graph.output]
    if len(names) == len(plan.outputs) and len(set(names)) == len(names):
        plan = _rename(plan, dict(zip(plan.outputs, names, strict=True)))
    return plan.check()


def _rename(plan: ModelPlan, new: Mapping[str, str]) -> ModelPlan:
    """The plan with buffers renamed (the outputs get the model's names), where no name would clash."""
    taken = {b.name for b in plan.buffers} - set(new)
    new = {old: n for old, n in new.items() if n not in taken and old != n}
    if not new:
        return plan

    def r(n: str) -> str:
        return new.get(n, n)

    return replace(plan, buffers=tuple(replace(b, name=r(b.name)) for b in plan.buffers),
                   launches=tuple(replace(ln, args=tuple(replace(a, buffer=r(a.buffer)) if a.buffer else a
                                                         for a in ln.args)) for ln in plan.launches),
                   inputs=tuple(r(n) for n in plan.inputs), outputs=tuple(r(n) for n in plan.outputs),
                   calls=tuple(replace(c, params=tuple(replace(t, buffer=r(t.buffer)) for t in c.params))
                               for c in plan.calls))


def _plan(main: Any, host: Mapping[str, Any], dev: Mapping[str, Any], source: str, arch: str,
          compiler: str) -> ModelPlan:
    import tvm
    from tvm import relax

    buffers: dict[str, dict[str, Any]] = {}
    tensors: dict[Any, tuple[str, int, tuple[int, ...], str]] = {}  # var -> (buffer, offset, shape, dtype)
    consts: list[tuple[Any, str]] = []
    blob = bytearray()
    launches: list[PlanLaunch] = []
    call_list: list[PlanCall] = []

    def fresh(base: str) -> str:
        n, i = base, 0
        while n in buffers:
            i += 1
            n = f"{base}_{i}"
        return n

    def add_buffer(base: str, kind: str, nbytes: int, dtype: str, shape: tuple[int, ...], off: int = -1) -> str:
        name = fresh(base)
        buffers[name] = {"name": name, "kind": kind, "nbytes": nbytes, "dtype": dtype, "shape": shape,
                         "constant_offset": off}
        return name

    inputs = []
    for p in main.params:
        shape, dtype = _tensor_type(p)
        name = add_buffer(p.name, "input", _nbytes(dtype, shape), dtype, shape)
        tensors[p] = (name, 0, shape, dtype)
        inputs.append(name)

    def tensor_of(a: Any) -> tuple[str, int, tuple[int, ...], str]:
        if isinstance(a, tvm.ir.GenericConst):
            for c, _ in consts:
                if c.same_as(a):
                    return tensors[c]
            arr = np.ascontiguousarray(a.value.numpy())
            off = -(-len(blob) // _ALIGN) * _ALIGN
            blob.extend(b"\0" * (off - len(blob)))
            blob.extend(arr.tobytes())
            name = add_buffer(f"const{len(consts)}", "constant", arr.nbytes, str(arr.dtype), tuple(arr.shape), off)
            consts.append((a, name))
            tensors[a] = (name, 0, tuple(arr.shape), str(arr.dtype))
            return tensors[a]
        if a in tensors:
            return tensors[a]
        raise Unsupported(f"argument {a} ({type(a).__name__}) is not a tensor the plan knows")

    blocks = main.body.blocks
    if len(blocks) != 1:
        raise Unsupported(f"a main function of {len(blocks)} blocks (control flow?)")
    storages: dict[Any, str] = {}
    calls = 0
    for bnd in blocks[0].bindings:
        if not isinstance(bnd, relax.VarBinding):
            raise Unsupported(f"a {type(bnd).__name__} binding")
        v, var = bnd.value, bnd.var
        if not isinstance(v, relax.Call):
            if isinstance(v, relax.Var) and v in tensors:
                tensors[var] = tensors[v]
                continue
            if isinstance(v, relax.Tuple):
                continue  # the return value; its fields are known
            raise Unsupported(f"a {type(v).__name__} value: {v}")
        op = v.op
        if isinstance(op, tvm.ir.Op):
            if op.name in ("relax.null_value", "relax.vm.kill_object"):
                continue
            if op.name == "relax.vm.alloc_storage":
                nbytes = _shape(v.args[0])[0]
                if str(v.args[2].value) != "uint8" or v.args[3].value != "global":
                    raise Unsupported(f"a storage that is not global bytes: {v}")
                storages[var] = add_buffer(var.name, "storage", nbytes, "uint8", (nbytes,))
                continue
            if op.name == "relax.vm.alloc_tensor":
                tensors[var] = (storages[v.args[0]], _int(v.args[1]), _shape(v.args[2]), str(v.args[3].value))
                continue
            raise Unsupported(f"the Relax operator {op.name}")
        if isinstance(op, relax.ExternFunc) and op.global_symbol in host:
            op = tvm.ir.GlobalVar(op.global_symbol)
        if isinstance(op, relax.ExternFunc):
            sym = op.global_symbol
            if sym in _IGNORED_PACKED:
                continue
            if sym in _VIEW_PACKED:
                src = tensors[v.args[0]]
                shape, dtype = _tensor_type(var)
                if _nbytes(dtype, shape) != _nbytes(src[3], src[2]):
                    raise Unsupported(f"a reshape that changes the size of {v.args[0]}")
                tensors[var] = (src[0], src[1], shape, dtype)
                continue
            raise Unsupported(f"the packed call {sym!r} (a library call kaas cannot run)")
        if not isinstance(op, tvm.ir.GlobalVar) or op.name_hint not in host:
            raise Unsupported(f"a call of {op}")
        fname = op.name_hint
        targs = [tensor_of(a) for a in v.args]

        def workspace(bname: str, nbytes: int, fname: str = fname) -> str:
            return add_buffer(f"ws_{fname}_{bname}", "workspace", int(nbytes), "uint8", (int(nbytes),))

        call_list.append(PlanCall(fname, tuple(PlanTensor(*t) for t in targs)))
        for kernel, grid, block, shared, raw in _launches(host[fname], dev, [t[2] for t in targs], workspace):
            args = []
            for a in raw:
                if a[0] == "param":
                    buf, off, shape, dtype = targs[a[1]]
                    args.append(PlanArg(buf, off, _nbytes(dtype, shape), param=a[1]))
                elif a[0] == "workspace":
                    args.append(PlanArg(a[1], 0, buffers[a[1]]["nbytes"]))
                else:
                    args.append(PlanArg(dtype=a[1], value=a[2]))
            launches.append(PlanLaunch(kernel, grid, block, shared, tuple(args), calls))
        calls += 1
    ret = main.body.body
    outs = []
    for r in (list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]):
        buf, off, shape, dtype = tensors[r]
        b = buffers[buf]
        if b["kind"] != "storage" or off != 0:
            raise Unsupported(f"an output that is not a storage of its own ({r})")
        # The storage that holds a returned tensor becomes the output buffer, typed as the tensor.
        b.update(kind="output", dtype=dtype, shape=shape, nbytes=_nbytes(dtype, shape)) \
            if b["nbytes"] >= _nbytes(dtype, shape) else None
        outs.append(buf)
    plan = ModelPlan(arch=arch, source=source,
                     buffers=tuple(PlanBuffer(**{**b, "shape": tuple(b["shape"])}) for b in buffers.values()),
                     launches=tuple(launches), inputs=tuple(inputs), outputs=tuple(outs), constants=bytes(blob),
                     compiler=compiler, calls=tuple(call_list))
    return plan.check()


def replay_with_tvm(model: Any, plan: ModelPlan, shapes: Mapping[str, Sequence[int]] | None,
                    inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``plan``'s launches in order on the CPU: each model-level call runs TVM's own (unscheduled)
    function of that call built for LLVM, over views into numpy buffers at the plan's offsets.  A
    check of the plan's buffers, offsets and order against the model (not of the CUDA kernels): each
    call's arguments are taken from its launches' (kernel-order) arguments, so the mapping from
    kernel arguments to the function's parameters is what is checked."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.backend.cuda import pipeline as cp
    from tvm.s_tir import dlight

    target = cuda_target(plan.arch)
    passes = (cp.library_dispatch_passes(target)
              + [p for p in cp.legalize_passes(target) if not isinstance(p, dlight.ApplyDefaultSchedule)]
              + cp.dataflow_lower_passes(target) + cp.finalize_passes(target))
    with target:
        mod = tvm.transform.Sequential(passes)(_import(model, shapes))
    wanted = {c.function for c in plan.calls}
    cpu = tvm.IRModule({gv: f.with_attr("global_symbol", gv.name_hint) for gv, f in mod.functions.items()
                        if isinstance(f, tirx.PrimFunc) and gv.name_hint in wanted})
    lib = tvm.tirx.build(cpu, target="llvm")
    roots: dict[str, np.ndarray] = {}
    for b in plan.buffers:
        raw = np.zeros(b.nbytes + 64, dtype=np.uint8)
        arr = raw[(-raw.ctypes.data) % 64:][:b.nbytes]  # DLPack wants 64-byte alignment
        if b.kind == "constant":
            arr[:] = np.frombuffer(plan.constants, np.uint8, b.nbytes, b.constant_offset)
        elif b.kind == "input":
            arr[:] = np.ascontiguousarray(inputs[b.name], dtype=b.dtype).view(np.uint8).reshape(-1)
        else:
            arr[:] = 0xFF  # NaN for floats: what a replay forgot to write shows
        roots[b.name] = arr
    for i, call in enumerate(plan.calls):
        where = {a.param: (a.buffer, a.offset) for ln in plan.launches if ln.call == i for a in ln.args if a.param >= 0}
        args = []
        for j, t in enumerate(call.params):
            buf, off = where.get(j, (t.buffer, t.offset))
            view = roots[buf][off:off + _nbytes(t.dtype, t.shape)].view(t.dtype).reshape(t.shape)
            args.append(tvm.runtime.from_dlpack(view))
        lib[call.function](*args)
    del relax
    return {n: roots[n].view(plan.buffer(n).dtype).reshape(plan.buffer(n).shape).copy() for n in plan.outputs}
