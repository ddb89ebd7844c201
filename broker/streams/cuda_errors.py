"""The CUDA backend's one error boundary: driver result codes become ``broker.errors`` exceptions.

Every raw ``(CUresult, value...)`` tuple of a ``cuda.bindings.driver`` call is checked by
``check`` (or, for a bare result code, turned into an exception by ``error``), which name the
error and describe it.  Raw result tuples never leave the ``cuda_*`` modules.

It also says which errors are *sticky* (the context is dead for the rest of the process: the
backend is poisoned and its worker replaced) and which of those a kernel caused (KernelFault)
rather than the hardware (DeviceError).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from cuda.bindings import driver

from .. import errors

__all__ = ["BAD_IMAGE", "KERNEL_FAULTS", "NOT_READY", "OOM", "STICKY", "check", "error", "graph_fault", "guarded",
           "is_sticky", "refused_launch"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

NOT_READY = driver.CUresult.CUDA_ERROR_NOT_READY
OOM = "CUDA_ERROR_OUT_OF_MEMORY"

# Errors after which the context is unusable for the rest of the process (the driver's
# "the process must be terminated and relaunched"): the backend is poisoned by any of them.
# Those a kernel causes are KernelFault; the hardware's own are DeviceError.
KERNEL_FAULTS = frozenset({
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_TIMEOUT", "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_CONTAINED", "CUDA_ERROR_TENSOR_MEMORY_LEAK",
})
STICKY = KERNEL_FAULTS | {"CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_NVLINK_UNCORRECTABLE"}

# Module-load failures that mean "this image is bad for this device", i.e. the tenant's input.
BAD_IMAGE = frozenset({
    "CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_INVALID_PTX", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    "CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_SOURCE", "CUDA_ERROR_INVALID_VALUE",
    "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
    "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
})


def _error_name(err: Any) -> str:
    try:
        res, name = driver.cuGetErrorName(err)
        if not res and name:
            return bytes(name).decode(errors="replace")
    except (TypeError, ValueError, RuntimeError):  # a code this binding does not know
        return f"CUresult({int(err)})"
    return getattr(err, "name", None) or f"CUresult({int(err)})"


def _error_string(err: Any) -> str:
    try:
        res, desc = driver.cuGetErrorString(err)
        if not res and desc:
            return bytes(desc).decode(errors="replace")
    except (TypeError, ValueError, RuntimeError):
        return "no description"
    return "no description"


def error(err: Any, what: str = "", **detail: Any) -> errors.DeviceError:
    """The exception for a failed driver call: KernelFault for a kernel's sticky fault, else DeviceError."""
    name = _error_name(err)
    message = f"{name}: {_error_string(err)}"
    if what:
        message = f"{what} failed: {message}"
    cls = errors.KernelFault if name in KERNEL_FAULTS else errors.DeviceError
    return cls(message, detail={"cuda_error": name, **detail})


def check(result: tuple[Any, ...], what: str = "") -> Any:
    """Return the value(s) of a ``cuda.bindings.driver`` call, or raise its error (see ``error``)."""
    err = result[0]
    if err:  # CUDA_SUCCESS is 0
        raise error(err, what)
    n = len(result)
    if n == 1:
        return None
    if n == 2:
        return result[1]
    return result[1:]


def refused_launch(exc: errors.KaasError) -> errors.KaasError:
    """A launch the driver refused (its error names the kernel's index) is a KernelFault."""
    if isinstance(exc, errors.DeviceError) and "cuda_error" in exc.detail and not isinstance(
            exc, errors.KernelFault) and "index" in exc.detail:
        return errors.KernelFault(exc.message, detail=exc.detail)
    return exc


def graph_fault(err: Any, what: str, names: dict[str, Any], in_flight: int) -> errors.DeviceError:
    """The error of a graph whose last event reports ``err``; a sticky one is a KernelFault."""
    exc = error(err, what)
    if is_sticky(exc):
        exc = errors.KernelFault(exc.message, detail=exc.detail)
    exc.detail.update(names)
    # A sticky fault surfaces on every graph in flight in this process, not only on the one
    # that caused it: with others in flight, this graph may be innocent.
    exc.detail["in_flight"] = in_flight
    if in_flight > 1:
        exc.detail["ambiguous"] = True
    return exc


def is_sticky(exc: BaseException) -> bool:
    """True for an error after which no CUDA call of this process works again."""
    return isinstance(exc, errors.KaasError) and exc.detail.get("cuda_error") in STICKY


class _Poisonable(Protocol):
    poisoned: bool


_S = TypeVar("_S", bound=_Poisonable)


def guarded(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Mark the backend poisoned when a sticky error passes out of ``method``."""

    @functools.wraps(method)
    def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except errors.KaasError as exc:
            if is_sticky(exc):
                self.poisoned = True
            raise

    return wrapper
