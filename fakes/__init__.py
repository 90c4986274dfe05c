"""Fakes of the external systems the gateway talks to, for the demo, the tests and benchmarks."""
