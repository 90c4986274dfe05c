"""Fakes of the external systems the gateway talks to, for the demo, the tests and benchmarks.

Not part of the product: a wheel carries none of it (tests/test_wheel.py), so run them from the
repository root, e.g. `python -m fakes.model_server --port 8001`. The product never imports them.
"""
