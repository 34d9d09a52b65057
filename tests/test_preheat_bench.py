"""``make bench-preheat`` small enough for ``make test``: N = 3 agents on the namespace testbed,
a 4 MiB layer, ``p2pd preheat`` then a rollout pull on every node that sends nothing upstream.
Needs root and ip/tc/skopeo/umoci/busybox: skipped without them, failed with CI=true."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.bench.preheat import run
from tests.harness.tools import require_root, require_tool


def test_tiny_bench_preheat(tmp_path: Path) -> None:
    require_root()
    for tool in ("ip", "tc", "skopeo", "umoci", "busybox"):
        require_tool(tool)
    before = set(Path(tempfile.gettempdir()).glob("preheat-layout-*"))
    result = run(3, 4, 50, 200, tmp_path / "work")
    # The image's layout was built in the run's directory and removed with it, none left in /tmp.
    assert not list((tmp_path / "work").glob("preheat-layout-*"))
    assert set(Path(tempfile.gettempdir()).glob("preheat-layout-*")) <= before
    assert result["preheat_rc"] == 0, result["preheat_output"]
    # The shaped seed link is respected, and the swarm shared the image: about one copy from the seed.
    assert result["preheat_s"] >= 0.9 * result["bound_s"]
    assert 0.99 <= result["seed_egress_preheat_over_image"] < 1.5
    assert result["rollout_ok"] and result["seed_egress_rollout_bytes"] == 0
