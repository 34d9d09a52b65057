"""Benchmarks run by ``make bench`` (not collected by pytest: no ``test_*`` modules here).

Modules:
    seed_throughput  blob GET throughput of the seed vs Debian's docker-registry (``make bench-seed``)
    p2pd_pull        containerd pulls through the p2pd agent vs straight from the seed (``make bench-p2pd``)
    p2pd_auth        pulls through the agent with each client's token checked vs open (``make bench-p2pd-auth``)
    signatures       manifest pull latency of a signed tag, [[signatures]] policy on vs off (``make bench-signatures``)
    scan             the seed's scanner: MiB/s per core on a 256 MiB image, p99 of blob pulls while it scans
                     (``make bench-scan``; its tiny version runs in tests/test_scan_bench.py)
    common           /proc accounting (``Meter``), tool lookup, ratios, the marked sections of benchmarks.md
    swarm            one image to N nodes on a shaped namespace network: direct, site cache, p2pd, the
                     Kumar-Ross bound (``make bench-swarm``; its tiny version runs in tests/test_netbed.py)
    netbed           the testbed: network namespaces, a bridge, tc tbf links, teardown (root)
    nsworker         the helper run inside each namespace (HTTP, containerd-like pulls, ctr)
"""
