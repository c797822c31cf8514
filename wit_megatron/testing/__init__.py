"""Helpers for tests and benchmarks that need several ranks on one CPU machine."""
