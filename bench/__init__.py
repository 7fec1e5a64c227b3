"""Benchmarks of the statevalue service."""
