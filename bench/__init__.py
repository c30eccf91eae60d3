"""Benchmarks against raw baselines (not tests): ``python -m bench``."""
