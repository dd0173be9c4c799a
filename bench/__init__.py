"""Benchmarks and the load and soak run: they print tables; not part of the proxy package."""
