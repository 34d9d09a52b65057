"""Benchmarks run by ``make bench`` (not collected by pytest: no ``test_*`` modules here).

Modules:
    seed_throughput  blob GET throughput of the seed vs Debian's docker-registry (``make bench-seed``)
"""
