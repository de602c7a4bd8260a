"""Benchmarks (library code; the ``structpeft bench`` command and CI's smoke tests call these)."""
