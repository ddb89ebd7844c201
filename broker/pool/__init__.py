"""The device pool: per-device memory accounting, residency and eviction policy (pure)."""

from .residency import Admission, Eviction, LruOrder, Pool, Quota, Resident

__all__ = ["Admission", "Eviction", "LruOrder", "Pool", "Quota", "Resident"]
