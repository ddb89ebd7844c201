"""The device pool: per-device memory accounting, residency and eviction policy (pure)."""
