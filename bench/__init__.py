"""kaas benchmarks against the baselines users would otherwise pick (see bench/RESULTS.md)."""
