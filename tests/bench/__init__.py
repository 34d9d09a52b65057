"""Benchmarks run by ``make bench`` (not collected by pytest: no ``test_*`` modules here).

Modules:
    seed_throughput  blob GET throughput of the seed vs Debian's docker-registry (``make bench-seed``)
    p2pd_pull        containerd pulls through the p2pd agent vs straight from the seed (``make bench-p2pd``)
    common           /proc accounting (``Meter``), tool lookup, ratios, the marked sections of benchmarks.md
"""
