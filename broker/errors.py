"""One error hierarchy for the broker and tenantlib, grouped by who is at fault.

Every class carries a stable wire ``code``.  The broker sends ``(code, message, detail)``
and tenantlib raises the class registered under that code, so a tenant catches the
same type the broker meant (the asyncpg ``exceptions/_base.py`` pattern).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "KaasError", "TenantError", "ProtocolError", "MalformedFrame", "FrameTooLarge",
    "UnknownMessage", "VersionMismatch", "HandshakeRequired", "InvalidArgument",
    "InvalidArena", "UnknownArena", "ArenaClosed", "UnknownLibrary", "UnknownKernel",
    "UnknownResident", "UnknownGraph", "InvalidGraph", "OutOfBounds", "Misaligned", "DtypeMismatch",
    "ArgumentError", "CycleError", "AccessError", "CompileError", "HostImplementationError",
    "QuotaError", "QuotaExceeded", "TooManyRequests", "DeviceError", "KernelFault",
    "DeadlineExceeded", "WorkerLost", "NoDevice", "BrokerError", "InternalError",
    "SessionClosed", "BrokerUnavailable", "ShuttingDown", "RequestTimeout",
    "error_class", "from_wire",
]

_REGISTRY: dict[str, type[KaasError]] = {}


class KaasError(Exception):
    """Base of every kaas error. ``code`` is stable on the wire; ``detail`` is JSON-able."""

    code: ClassVar[str] = "kaas_error"

    def __init__(self, message: str = "", *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is not None:
            if code in _REGISTRY:
                raise TypeError(f"duplicate kaas error code {code!r}")
            _REGISTRY[code] = cls

    def __str__(self) -> str:
        return self.message or self.code

    def __reduce__(self) -> Any:
        return (_rebuild, (self.code, self.message, self.detail))


def _rebuild(code: str, message: str, detail: dict[str, Any]) -> KaasError:
    return from_wire(code, message, detail)


_REGISTRY[KaasError.code] = KaasError


# -- the tenant's fault -------------------------------------------------------------------
class TenantError(KaasError):
    """The request cannot be served as sent: fix the request."""

    code = "tenant_error"


class ProtocolError(TenantError):
    code = "protocol_error"


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnknownMessage(ProtocolError):
    code = "unknown_message"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class HandshakeRequired(ProtocolError):
    code = "handshake_required"


class InvalidArgument(TenantError):
    code = "invalid_argument"


class InvalidArena(TenantError):
    """The handed-over file descriptor is not an acceptable shared-memory segment."""

    code = "invalid_arena"


class UnknownArena(TenantError):
    code = "unknown_arena"


class ArenaClosed(TenantError):
    code = "arena_closed"


class UnknownLibrary(TenantError):
    code = "unknown_library"


class UnknownKernel(TenantError):
    code = "unknown_kernel"


class UnknownResident(TenantError):
    code = "unknown_resident"


class UnknownGraph(TenantError):
    """A prepared-graph handle this session does not hold (never prepared, released, or another's)."""

    code = "unknown_graph"


class InvalidGraph(TenantError):
    code = "invalid_graph"


class OutOfBounds(InvalidGraph):
    code = "out_of_bounds"


class Misaligned(InvalidGraph):
    code = "misaligned"


class DtypeMismatch(InvalidGraph):
    code = "dtype_mismatch"


class ArgumentError(InvalidGraph):
    code = "argument_error"


class CycleError(InvalidGraph):
    code = "cycle"


class AccessError(InvalidGraph):
    """A kernel would write a buffer that is read-only (``in`` or ``resident``)."""

    code = "access_error"


class CompileError(TenantError):
    """NVRTC refused the source; ``detail['log']`` holds the compiler log."""

    code = "compile_error"


class HostImplementationError(TenantError):
    """A kernel's host implementation is missing, not allowed, or raised."""

    code = "host_implementation_error"


class SignatureMismatch(TenantError):
    """A kernel's declared signature disagrees with its source or its compiled binary."""

    code = "signature_mismatch"


class UnsupportedFeature(TenantError):
    """A kernel needs something kaas cannot give it yet (a launch feature, a parameter type)."""

    code = "unsupported_feature"


# -- quotas and flow control --------------------------------------------------------------
class QuotaError(KaasError):
    code = "quota_error"


class QuotaExceeded(QuotaError):
    code = "quota_exceeded"


class TooManyRequests(QuotaError):
    code = "too_many_requests"


# -- the device ---------------------------------------------------------------------------
class DeviceError(KaasError):
    code = "device_error"


class KernelFault(DeviceError):
    code = "kernel_fault"


class DeadlineExceeded(DeviceError):
    code = "deadline_exceeded"


class WorkerLost(DeviceError):
    code = "worker_lost"


class NoDevice(DeviceError):
    code = "no_device"


# -- the broker ---------------------------------------------------------------------------
class BrokerError(KaasError):
    code = "broker_error"


class InternalError(BrokerError):
    code = "internal_error"


class ShuttingDown(BrokerError):
    code = "shutting_down"


# -- the connection (raised in tenantlib) ------------------------------------------------
class SessionClosed(KaasError):
    code = "session_closed"


class BrokerUnavailable(KaasError):
    code = "broker_unavailable"


class RequestTimeout(KaasError):
    code = "request_timeout"


def error_class(code: str) -> type[KaasError]:
    """The class registered under ``code`` (``KaasError`` for codes this version does not know)."""
    return _REGISTRY.get(code, KaasError)


def from_wire(code: str, message: str, detail: dict[str, Any] | None = None) -> KaasError:
    cls = error_class(code)
    err = cls(message, detail=detail)
    if cls is KaasError and code != KaasError.code:
        err.detail.setdefault("code", code)
    return err


class Quarantined(TenantError):
    """This tenant's kernel faulted repeatedly; refused until an admin clears it."""

    code = "quarantined"


class PermissionDenied(TenantError):
    """The peer is not allowed to do this (not a tenant, not an admin)."""

    code = "permission_denied"


__all__ += ["PermissionDenied", "Quarantined", "SignatureMismatch", "UnsupportedFeature"]
