"""Benchmarks: what the gateway adds on top of the model server, measured side by side (see docs/performance.md)."""
