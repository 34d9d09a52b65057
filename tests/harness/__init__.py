"""Test harness: start real tools (registry, skopeo, umoci, containerd) in temp dirs on loopback.

Plain synchronous helpers (subprocess based). From trio tests call them through
``trio.to_thread.run_sync``. This package must not import ``p2pd`` or ``seed``; the one
exception is ``faulty_proxy``, a trio server built on ``p2pd.httpd`` (nothing else imports it).

Modules:
    net                 free_port, wait_http_ok, loopback guards
    tools               require_tool, require_root, run, start_process, stop_process
    process             ManagedProcess (shared start/stop/kill9/restart/context-manager lifecycle)
    reference_registry  ReferenceRegistry (CNCF distribution ``docker-registry serve``)
    images              OciLayout, build_busybox_layout, add_random_layer, write_layout_image
    skopeo              copy, inspect_raw, inspect_digest
    containerd          PrivateContainerd, write_hosts_toml
    seed_process        SeedProcess (the seed as a real subprocess: kill9, restart, metrics)
    verify              misnamed_blobs, image_digests, pull_and_verify (skopeo pull + digest checks)
    p2pd_process        P2pdProcess (the agent as a real subprocess: kill9, restart, metrics), parse_metrics
    faulty_proxy        serve_faulty_proxy: truncating/corrupting/throttling/stalling/counting registry proxy
    fixtures            pytest fixtures (registered in tests/conftest.py)
"""
