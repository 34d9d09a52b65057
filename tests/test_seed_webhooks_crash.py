"""kill -9 of a real seed process (``SeedProcess``) with webhook events not yet delivered: after a
restart on the same data directory every event arrives, in order, and the only duplicate
(same event id) is the one delivery that was in flight at the kill.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from seed.events import FileEventQueue, webhooks_directory
from tests.harness.seed_process import SeedProcess
from tests.test_seed_api import push_image
from tests.test_seed_webhooks import TOML_SECRET, Receiver, start_receiver


def write_config(tmp_path: Path, receiver: Receiver) -> Path:
    path = tmp_path / "seed.toml"
    # Pushes and tag moves only: the seed's scanner also reports (scan.completed) whenever it gets
    # to an image, which on a loaded machine falls between the pushes this test orders.
    path.write_text(f'[[webhooks]]\nname = "ci"\nurl = "{receiver.url}"\n{TOML_SECRET}\ntimeout = 2.0\n'
                    'backoff_initial = 0.05\nbackoff_max = 0.2\nevents = ["push", "tag.moved"]\n')
    return path


@pytest.fixture
async def seed_for(tmp_path: Path) -> AsyncIterator[list[SeedProcess]]:
    """Seeds started by a test; stopped (if still running) at the end."""
    started: list[SeedProcess] = []
    yield started
    for seed in started:
        await trio.to_thread.run_sync(seed.stop)


async def push_tags(seed: SeedProcess, count: int) -> list[tuple[str, str, str]]:
    """Pushes ``count`` images as app:v0..; returns the (type, tag, digest) of the events each causes."""
    expected = []
    async with httpx.AsyncClient(base_url=seed.url, trust_env=False, timeout=30) as client:
        for n in range(count):
            _manifest, digest, _layers = await push_image(client, "team/app", f"v{n}", seed_bytes=n)
            expected += [("push", f"v{n}", digest), ("tag.moved", f"v{n}", digest)]
    return expected


def first_appearances(accepted: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    seen: set[object] = set()
    order = []
    for document in accepted:
        if document["id"] not in seen:
            seen.add(document["id"])
            order.append((document["type"], document["tag"], document["digest"]))
    return order


async def test_undelivered_events_are_delivered_after_kill_9(nursery: trio.Nursery, tmp_path: Path,
                                                             seed_for: list[SeedProcess]) -> None:
    receiver = await start_receiver(nursery, Receiver(default_status=503))  # the endpoint is down
    seed = SeedProcess(tmp_path / "data", config_path=write_config(tmp_path, receiver))
    seed_for.append(seed)
    await trio.to_thread.run_sync(seed.start)
    expected = await push_tags(seed, 4)
    await receiver.wait_until(lambda: len(receiver.deliveries) >= 2)  # it is being tried, and refused
    await trio.to_thread.run_sync(seed.kill9)

    # Every event is on disk: each push was answered only once its events were.
    with FileEventQueue(webhooks_directory(tmp_path / "data"), read_only=True) as view:
        assert view.stats("ci").depth == len(expected)
    assert receiver.accepted == []

    receiver.default_status = 200  # the endpoint is back
    await trio.to_thread.run_sync(seed.start)
    accepted = await receiver.wait_for(len(expected), limit=20)
    assert first_appearances(accepted) == expected
    assert len({document["id"] for document in accepted}) == len(accepted) == len(expected)  # nothing twice
    assert receiver.bad_signatures == 0 and receiver.schema_errors == []


async def test_kill_9_during_deliveries_loses_nothing(nursery: trio.Nursery, tmp_path: Path,
                                                      seed_for: list[SeedProcess]) -> None:
    receiver = await start_receiver(nursery)
    receiver.delays.extend([0.15] * 1000)  # a slow endpoint: deliveries are in flight when the seed dies
    seed = SeedProcess(tmp_path / "data", config_path=write_config(tmp_path, receiver))
    seed_for.append(seed)
    await trio.to_thread.run_sync(seed.start)
    expected = await push_tags(seed, 6)
    await receiver.wait_for(3, limit=20)
    await trio.to_thread.run_sync(seed.kill9)
    before_restart = len(receiver.accepted)
    assert before_restart < len(expected)

    await trio.to_thread.run_sync(seed.start)
    await receiver.wait_until(lambda: len({d["id"] for d in receiver.accepted}) == len(expected), limit=30)
    accepted = receiver.accepted
    assert first_appearances(accepted) == expected
    # At least once: the event in flight at the kill may arrive twice (same id), nothing else.
    repeats = {event_id: n for event_id, n in Counter(d["id"] for d in accepted).items() if n > 1}
    assert len(repeats) <= 1 and all(n == 2 for n in repeats.values())
    assert receiver.bad_signatures == 0 and receiver.schema_errors == []
