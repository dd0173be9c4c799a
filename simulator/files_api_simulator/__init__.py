"""A local Anthropic Files API for tests, benchmarks, demos and offline development: its own package,
so that the proxy's package holds and depends on nothing only the simulator needs (multipart parsing)."""

from files_api_simulator.simulator import ReceivedRequest, Simulator, create_app

__all__ = ["ReceivedRequest", "Simulator", "create_app"]
