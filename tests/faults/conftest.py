"""Fault tests: real processes cut, paused, killed and restarted."""

from tests.mesh.conftest import make_puppet, nats_factory  # noqa: F401  (fixtures)
