"""Small deterministic models and data for tests and benchmarks (not part of the runtime API)."""
