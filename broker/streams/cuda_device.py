"""The device a CUDA backend drives: its primary context and what the worker reports about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from .cuda_errors import check

__all__ = ["Facts", "facts", "retain"]


@dataclass(frozen=True, slots=True)
class Facts:
    arch: str  # sm_XY: what NVRTC compiles CUBIN for
    name: str
    memory: int  # bytes
    driver_version: int
    sm_count: int
    shared_optin: int = 48 * 1024  # bytes of shared memory one block may opt in to


def retain(index: int) -> tuple[Any, Any]:
    """Initialise the driver; the device ``index`` and its primary context (to release when done)."""
    check(driver.cuInit(0), "cuInit")
    device = check(driver.cuDeviceGet(index), f"cuDeviceGet({index})")
    return device, check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")


def facts(device: Any) -> Facts:
    attr = driver.CUdevice_attribute
    major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
    minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
    raw_name = check(driver.cuDeviceGetName(256, device))
    return Facts(
        arch=f"sm_{major}{minor}",
        name=bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace").strip(),
        memory=int(check(driver.cuDeviceTotalMem(device))),
        driver_version=int(check(driver.cuDriverGetVersion())),
        sm_count=int(check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device))),
        shared_optin=int(check(driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device))))
