"""The swarm's pure core, without trio or sockets: rendezvous hashing, HMAC authentication,
msgpack messages, chunk planning and the coordinator's soft state.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import os
import random
import stat
from collections import Counter
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import p2pd.cli
from p2pd.oci.digest import Digest
from p2pd.swarm import auth, coordinator, messages, planning, rendezvous
from p2pd.swarm.auth import AuthError
from p2pd.swarm.coordinator import MIN_RANGE_CHUNKS, CoordinatorState, leases_at_once, split_ranges
from p2pd.swarm.messages import MAX_HOLDERS, Announce, MessageError, PeerInfo, RangeLease, Reply, decode, encode
from p2pd.swarm.planning import (
    LESSEE_LOOKAHEAD,
    Bitmap,
    ChunkRequest,
    _draw,
    lessee_view,
    plan_requests,
    request_slots,
)


def _digest(name: str) -> Digest:
    return Digest("sha256", hashlib.sha256(name.encode()).hexdigest())


# ---- layering -------------------------------------------------------------------------

_PURE = (rendezvous, auth, messages, planning, coordinator)
_IO_MODULES = {
    "trio",
    "anyio",
    "asyncio",
    "httpx",
    "httpcore",
    "h11",
    "zeroconf",
    "socket",
    "ssl",
    "os",
    "subprocess",
    "threading",
    "select",
    "selectors",
    "p2pd.httpd",
    "p2pd.store",
    "p2pd.upstream",
}


@pytest.mark.parametrize("module", _PURE, ids=lambda m: m.__name__)
def test_pure_swarm_modules_import_no_io(module: object) -> None:
    path = Path(module.__file__)  # type: ignore[attr-defined]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module)
    bad = {name for name in imported if name in _IO_MODULES or name.split(".")[0] in _IO_MODULES}
    assert not bad, f"{path.name} imports {bad}"


# ---- rendezvous -----------------------------------------------------------------------

_MEMBERS = [f"node-{i:03d}" for i in range(50)]
_KEYS = [str(_digest(f"blob-{i}")) for i in range(10_000)]


@pytest.fixture(scope="module")
def placement() -> dict[str, list[str]]:
    """Each key's full ranking over the 50 members plus one newcomer (computed once)."""
    members = [*_MEMBERS, "node-new"]
    return {key: rendezvous.rank(key, members) for key in _KEYS}


def _top(ranking: list[str], members: set[str]) -> str:
    return next(node for node in ranking if node in members)


def test_rendezvous_join_moves_about_one_nth_and_only_to_the_newcomer(placement: dict[str, list[str]]) -> None:
    before_members, after_members = set(_MEMBERS), {*_MEMBERS, "node-new"}
    moved = 0
    for ranking in placement.values():
        before, after = _top(ranking, before_members), _top(ranking, after_members)
        if before != after:
            moved += 1
            assert after == "node-new", "a join may only move keys to the node that joined"
    expected = len(_KEYS) / len(after_members)  # ~196
    print(f"join: {moved} of {len(_KEYS)} coordinators moved (1/N = {expected:.0f})")
    assert 0.6 * expected <= moved <= 1.4 * expected


def test_rendezvous_leave_moves_exactly_the_leavers_keys(placement: dict[str, list[str]]) -> None:
    members = set(_MEMBERS)
    owners = Counter(_top(ranking, members) for ranking in placement.values())
    leaver = "node-017"
    after_members = members - {leaver}
    moved = 0
    for ranking in placement.values():
        before, after = _top(ranking, members), _top(ranking, after_members)
        if before != after:
            moved += 1
            assert before == leaver, "a leave may only move the keys the leaver coordinated"
            # The takeover is the first backup: ranking position 2 among the old members.
            assert after == [n for n in ranking if n in members][1]
    assert moved == owners[leaver]
    expected = len(_KEYS) / len(members)  # 200
    print(f"leave: {moved} of {len(_KEYS)} coordinators moved (1/N = {expected:.0f})")
    assert 0.6 * expected <= moved <= 1.4 * expected
    # The load is spread: no member coordinates more than twice its share.
    assert max(owners.values()) < 2 * expected and len(owners) == len(members)


def test_rendezvous_all_nodes_agree_whatever_their_member_order() -> None:
    rng = random.Random(7)
    for key in _KEYS[:200]:
        views = []
        for _ in range(5):
            members = list(_MEMBERS)
            rng.shuffle(members)
            views.append(rendezvous.coordinators(key, members + members[:3], 3))  # duplicates too
        assert all(view == views[0] for view in views)


def test_rendezvous_coordinators_and_backups() -> None:
    key = _KEYS[0]
    ranking = rendezvous.rank(key, _MEMBERS)
    assert sorted(ranking) == sorted(_MEMBERS)
    chosen = rendezvous.coordinators(key, _MEMBERS, 3)
    assert chosen == ranking[:3] and len(set(chosen)) == 3
    assert [rendezvous.score(key, n) for n in chosen] == sorted(
        (rendezvous.score(key, n) for n in chosen), reverse=True
    )
    assert rendezvous.coordinators(key, ["a", "b"], 5) == rendezvous.rank(key, ["a", "b"])
    assert rendezvous.coordinators(key, [], 3) == []
    assert rendezvous.coordinators(key, _MEMBERS, 0) == []
    # When the coordinator leaves, the old backups become the new coordinator and first backup.
    survivors = [n for n in _MEMBERS if n != chosen[0]]
    assert rendezvous.coordinators(key, survivors, 2) == chosen[1:3]
    # The weight depends on both the key and the node.
    assert rendezvous.score(key, "a") != rendezvous.score(_KEYS[1], "a")


# ---- auth -----------------------------------------------------------------------------

KEY = bytes(range(32))
NOW = 1_800_000_000.0


def _signed_request(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "method": "POST",
        "target": "/p2p/v1/announce",
        "node_id": "node-a",
        "timestamp": NOW,
        "body": b"hello",
    }
    fields["signature"] = auth.sign_request(
        KEY,
        str(fields["method"]),
        str(fields["target"]),
        str(fields["node_id"]),
        float(fields["timestamp"]),  # type: ignore[arg-type]
        bytes(fields["body"]),
    )  # type: ignore[arg-type]
    fields.update(overrides)
    return fields


def _verify_request(fields: dict[str, object], *, key: bytes = KEY, now: float = NOW) -> None:
    auth.verify_request(
        key,
        str(fields["method"]),
        str(fields["target"]),
        str(fields["node_id"]),
        str(int(fields["timestamp"])),
        str(fields["signature"]),
        now,  # type: ignore[call-overload]
        bytes(fields["body"]),
    )  # type: ignore[arg-type]


def test_signed_request_verifies() -> None:
    _verify_request(_signed_request())
    _verify_request(_signed_request(), now=NOW + auth.MAX_SKEW - 1)
    _verify_request(_signed_request(), now=NOW - auth.MAX_SKEW + 1)
    # The method is case-insensitive (HTTP methods are upper case on the wire anyway).
    _verify_request(_signed_request(method="post"))


@pytest.mark.parametrize(
    "field,value",
    [
        ("method", "GET"),
        ("target", "/p2p/v1/announce?x=1"),
        ("target", "/p2p/v1/hello"),
        ("node_id", "node-b"),
        ("body", b"hellO"),
        ("body", b""),
        ("timestamp", NOW + 1),
        ("signature", "00" * 32),
        ("signature", ""),
    ],
)
def test_tampered_request_is_refused(field: str, value: object) -> None:
    with pytest.raises(AuthError):
        _verify_request(_signed_request(**{field: value}))


def test_replay_outside_the_window_and_bad_timestamps_are_refused() -> None:
    fields = _signed_request()
    for now in (NOW + auth.MAX_SKEW + 1, NOW - auth.MAX_SKEW - 1, NOW + 3600):
        with pytest.raises(AuthError, match="skew"):
            _verify_request(fields, now=now)
    for bad in ("", "soon", "1.5e9", None):
        with pytest.raises(AuthError, match="timestamp"):
            auth.verify_request(
                KEY,
                "POST",
                "/p2p/v1/announce",
                "node-a",
                bad,
                str(fields["signature"]),  # type: ignore[arg-type]
                NOW,
                b"hello",
            )


def test_wrong_key_is_refused() -> None:
    other = auth.parse_key(auth.generate_key())
    with pytest.raises(AuthError):
        _verify_request(_signed_request(), key=other)
    signature = auth.sign_response(other, "/p2p/v1/hello", 200, "node-a", NOW, b"x")
    with pytest.raises(AuthError):
        auth.verify_response(KEY, "/p2p/v1/hello", 200, "node-a", str(int(NOW)), signature, NOW, b"x")


def test_signed_response_verifies_and_tampering_is_refused() -> None:
    target, body = "/p2p/v1/chunkmap/" + str(_digest("x")), b"\x81\xa1a\x01"
    signature = auth.sign_response(KEY, target, 200, "node-a", NOW, body)
    auth.verify_response(KEY, target, 200, "node-a", str(int(NOW)), signature, NOW + 5, body)
    tampered = [
        (target + "x", 200, "node-a", NOW, body),
        (target, 206, "node-a", NOW, body),
        (target, 200, "node-b", NOW, body),
        (target, 200, "node-a", NOW - 1, body),
        (target, 200, "node-a", NOW, body + b"\x00"),
    ]
    for t, status, node, timestamp, data in tampered:
        with pytest.raises(AuthError):
            auth.verify_response(KEY, t, status, node, str(int(timestamp)), signature, NOW, data)
    with pytest.raises(AuthError, match="skew"):
        auth.verify_response(KEY, target, 200, "node-a", str(int(NOW)), signature, NOW + 1000, body)
    # A request signature is not a response signature (no reflection between the two).
    request_signature = auth.sign_request(KEY, "GET", target, "node-a", NOW)
    with pytest.raises(AuthError):
        auth.verify_response(KEY, target, 200, "node-a", str(int(NOW)), request_signature, NOW, b"")


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    fields = _signed_request()
    _verify_request(fields)
    with pytest.raises(AuthError):
        _verify_request(_signed_request(signature="ab" * 32))
    signature = auth.sign_response(KEY, "/t", 200, "n", NOW, b"")
    auth.verify_response(KEY, "/t", 200, "n", str(int(NOW)), signature, NOW, b"")
    assert [b for _a, b in calls] == [fields["signature"], "ab" * 32, signature]
    # And no plain equality on signatures anywhere in the module.
    source = Path(auth.__file__).read_text()
    assert "signature ==" not in source and "== signature" not in source


def test_key_parsing() -> None:
    key = auth.generate_key()
    assert len(key) == 2 * auth.KEY_BYTES and bytes.fromhex(key)
    assert auth.generate_key() != key
    assert auth.parse_key(f"  {key}\n") == bytes.fromhex(key)
    assert auth.parse_key("ab" * 64) == b"\xab" * 64  # longer keys are fine
    for bad in ("", "ab" * 31, "zz" * 32, "abc" + "0" * 62, key[:-1], "0x" + key[2:], "é" * 64):
        with pytest.raises(AuthError):
            auth.parse_key(bad)


def test_keygen_writes_a_private_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cluster.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        assert p2pd.cli.main(["keygen", "--out", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = out.read_text()
    assert len(auth.parse_key(key)) == auth.KEY_BYTES
    assert key.strip() not in capsys.readouterr().out  # the secret is not echoed
    # An existing key is never overwritten.
    assert p2pd.cli.main(["keygen", "--out", str(out)]) != 0
    assert out.read_text() == key
    # Without --out it prints one.
    assert p2pd.cli.main(["keygen"]) == 0
    assert len(auth.parse_key(capsys.readouterr().out)) == auth.KEY_BYTES


# ---- messages -------------------------------------------------------------------------

DIGEST = _digest("layer")
DIGEST_B = _digest("another layer")


def _announce(**overrides: object) -> Announce:
    fields: dict[str, object] = dict(
        digest=DIGEST,
        node="node-a",
        address="127.0.0.10:7000",
        site="rack-1",
        size=5 * 2**20,
        chunk_size=2**20,
        complete=False,
        have=b"\xa8",
        want_lease=True,
        gone=False,
    )
    fields.update(overrides)
    return Announce(**fields)  # type: ignore[arg-type]


def test_messages_round_trip() -> None:
    for message in (
        _announce(),
        _announce(complete=True, have=None, size=None, want_lease=False),
        _announce(gone=True, have=None),
        _announce(leased=True),
        _announce(disputed=("node-x", "node-y")),
        _announce(leased=True, ranges=((0, 3), (8, 11))),
        _announce(have=None, want_lease=False, handoff=True),
        _announce(lessees=(RangeLease("node-b", "127.0.0.11:7000", 0, 3), RangeLease("node-c", "c:1", 4, 7))),
        _announce(leased=True, ranges=((4, 7),), whole_blob=True),
        _announce(leased=True, ranges=((4, 7),), upstream_bytes=123_456),
        _announce(compact=True),
    ):
        assert decode(encode(message)) == message
    # A message from a node that does not send the newer flags still decodes.
    old = {k: v for k, v in _announce_dict().items() if k not in ("gone", "leased")}
    assert decode(msgpack.packb(old)) == Announce(DIGEST, "n", "a:1", "s", 10, 4, False, b"\x00", False, False, False)
    reply = Reply(
        (
            PeerInfo("node-b", "127.0.0.11:7000", "rack-1", True, None),
            PeerInfo("node-c", "127.0.0.12:7000", "rack-2", False, b"\x80"),
        ),
        "node-b",
        "127.0.0.11:7000",
        False,
        15.0,
    )
    assert decode(encode(reply)) == reply
    empty = Reply((), None, None, True, 2)
    assert decode(encode(empty)) == Reply((), None, None, True, 2.0)
    full = Reply(
        tuple(PeerInfo(f"n{i}", f"127.0.0.1:{i + 1}", "s", True, None) for i in range(MAX_HOLDERS)),
        None,
        None,
        False,
        1.0,
    )
    assert decode(encode(full)) == full


def test_a_compact_reply_is_the_same_reply_in_fewer_bytes() -> None:
    """An asker that announces ``compact`` gets the holders and range leases as arrays, holders of
    its own site without their site: half the bytes. One that does not (an older node) gets the
    maps it reads."""
    # A reply as the N = 32 testbed's coordinators send them (node ids, addresses and site names
    # as there, 128-chunk bitmaps, 16 range leases), some holders of another site.
    holders = tuple(PeerInfo(f"n{i}", f"10.88.0.{10 + i}:7080", "net-10-88-0-0" if i % 4 else "net-10-99-0-0",
                             i % 3 == 0, None if i % 3 == 0 else bytes(16)) for i in range(2, 33))
    reply = Reply(holders, "n1", "10.88.0.11:7080", True, 15.0, ranges=((0, 7),),
                  lessees=tuple(RangeLease(f"n{i}", f"10.88.0.{10 + i}:7080", 8 * i, 8 * i + 7) for i in range(16)),
                  compact=True, site="net-10-88-0-0")
    data = encode(reply)
    assert decode(data) == reply
    maps = encode(replace(reply, compact=False, site=None))
    assert decode(maps) == replace(reply, compact=False, site=None)
    assert len(data) < 0.55 * len(maps), (len(data), len(maps))
    with pytest.raises(ValueError):
        encode(replace(reply, site=None))
    # The coordinator answers each asker in the form it announced.
    state = CoordinatorState()
    for node in ("node-a", "node-b"):
        state.announce(_announce(node=node, site="site-a"), 1.0)
    answer = state.announce(_announce(node="node-c", site="site-a", compact=True), 1.0)
    assert answer.compact and answer.site == "site-a" and [p.node for p in answer.holders] == ["node-b", "node-a"]
    assert decode(encode(answer)) == answer
    old = state.announce(_announce(node="node-d", site="site-a"), 1.0)
    assert not old.compact and old.site is None and len(old.holders) == 3


def _announce_dict(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "t": "announce",
        "digest": str(DIGEST),
        "node": "n",
        "address": "a:1",
        "site": "s",
        "size": 10,
        "chunk_size": 4,
        "complete": False,
        "have": b"\x00",
        "want_lease": False,
        "gone": False,
        "leased": False,
    }
    body.update(overrides)
    return body


def _reply_dict(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "t": "reply",
        "holders": [],
        "lease_holder": None,
        "lease_address": None,
        "granted": False,
        "lease_ttl": 15.0,
    }
    body.update(overrides)
    return body


_HOLDER = {"node": "n", "address": "a:1", "site": "s", "complete": True, "have": None}
_COMPACT_HOLDER = ["n", "a:1", None, False, b"\x80"]
_COMPACT_LESSEE = ["n", "a:1", 0, 1]

MALFORMED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc1", id="reserved-byte"),
    pytest.param(b"\x92\x01", id="truncated"),
    pytest.param(msgpack.packb(_announce_dict()) + b"\x00", id="trailing-bytes"),
    pytest.param(b"not msgpack at all, just text", id="text"),
    pytest.param(msgpack.packb([1, 2, 3]), id="not-a-map"),
    pytest.param(msgpack.packb("announce"), id="a-string"),
    pytest.param(msgpack.packb({"t": "hello"}), id="unknown-type"),
    pytest.param(msgpack.packb({"x": 1}), id="no-type"),
    pytest.param(msgpack.packb({1: 2}, strict_types=False), id="int-keys"),
    pytest.param(msgpack.packb(_announce_dict(size="10")), id="size-str"),
    pytest.param(msgpack.packb(_announce_dict(size=-1)), id="size-negative"),
    pytest.param(msgpack.packb(_announce_dict(size=True)), id="size-bool"),
    pytest.param(msgpack.packb(_announce_dict(chunk_size=0)), id="chunk-size-zero"),
    pytest.param(msgpack.packb(_announce_dict(chunk_size=1.5)), id="chunk-size-float"),
    pytest.param(msgpack.packb(_announce_dict(chunk_size=None)), id="chunk-size-missing"),
    pytest.param(msgpack.packb(_announce_dict(complete=1)), id="flag-int"),
    pytest.param(msgpack.packb(_announce_dict(gone="yes")), id="flag-str"),
    pytest.param(msgpack.packb(_announce_dict(leased=None)), id="leased-none"),
    pytest.param(msgpack.packb(_announce_dict(whole_blob=1)), id="whole-blob-int"),
    pytest.param(msgpack.packb(_announce_dict(upstream_bytes=-1)), id="upstream-bytes-negative"),
    pytest.param(msgpack.packb(_announce_dict(upstream_bytes=True)), id="upstream-bytes-bool"),
    pytest.param(msgpack.packb(_announce_dict(digest="sha256:1234")), id="bad-digest"),
    pytest.param(msgpack.packb(_announce_dict(digest=5)), id="digest-int"),
    pytest.param(msgpack.packb(_announce_dict(node="")), id="empty-node"),
    pytest.param(msgpack.packb(_announce_dict(node="x" * 256)), id="long-node"),
    pytest.param(msgpack.packb(_announce_dict(address=["a"])), id="address-list"),
    pytest.param(msgpack.packb(_announce_dict(site=None)), id="site-missing"),
    pytest.param(msgpack.packb(_announce_dict(have="0000")), id="have-str"),
    pytest.param(
        msgpack.packb(_announce_dict(have=b"\x00" * (messages.MAX_MESSAGE_BYTES // 8 + 1))), id="have-too-large"
    ),
    pytest.param(msgpack.packb(_reply_dict(holders={})), id="holders-map"),
    pytest.param(msgpack.packb(_reply_dict(holders=[_HOLDER] * (MAX_HOLDERS + 1))), id="too-many-holders"),
    pytest.param(msgpack.packb(_reply_dict(holders=[1])), id="holder-int"),
    pytest.param(msgpack.packb(_reply_dict(holders=[{**_HOLDER, "complete": None}])), id="holder-complete"),
    pytest.param(msgpack.packb(_reply_dict(holders=[{**_HOLDER, "node": 7}])), id="holder-node"),
    pytest.param(msgpack.packb(_reply_dict(granted=1)), id="granted-int"),
    pytest.param(msgpack.packb(_reply_dict(compact=1, site="s")), id="compact-int"),
    pytest.param(msgpack.packb(_reply_dict(compact=True)), id="compact-without-site"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", holders=[_HOLDER])), id="compact-holder-map"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", holders=[["n", "a:1", None, True]])),
                 id="compact-holder-short"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", holders=[["n", "a:1", 3, True, None]])),
                 id="compact-holder-site-int"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", holders=[["n", "a:1", None, 1, None]])),
                 id="compact-holder-complete-int"),
    pytest.param(msgpack.packb(_announce_dict(compact="yes")), id="announce-compact-str"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", lessees=[{"node": "n", "address": "a:1",
                                                                              "first": 0, "last": 1}])),
                 id="compact-lessee-map"),
    pytest.param(msgpack.packb(_reply_dict(compact=True, site="s", lessees=[["n", "a:1", 2, 1]])),
                 id="compact-lessee-backwards"),
    pytest.param(msgpack.packb(_reply_dict(lease_ttl="15")), id="ttl-str"),
    pytest.param(msgpack.packb(_reply_dict(lease_ttl=True)), id="ttl-bool"),
    pytest.param(msgpack.packb(_reply_dict(lease_holder="")), id="lease-holder-empty"),
    pytest.param(msgpack.packb(_reply_dict(lease_address=3)), id="lease-address-int"),
    pytest.param(msgpack.packb(list(range(100_000))), id="huge-array"),
    pytest.param(msgpack.packb({str(i): i for i in range(1000)}), id="huge-map"),
    pytest.param(b"\x91" * 5000 + b"\x00", id="deep-nesting"),
    pytest.param(b"\xdd\xff\xff\xff\xff", id="array-claims-4g-items"),
    pytest.param(b"\xc6\xff\xff\xff\xff", id="bin-claims-4g-bytes"),
    pytest.param(msgpack.packb(msgpack.ExtType(1, b"x")), id="ext-type"),
    pytest.param(b"\x00" * (messages.MAX_MESSAGE_BYTES + 1), id="too-large"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_messages_raise_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=512),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats()
            | st.text(max_size=20)
            | st.binary(max_size=20),
            lambda children: (
                st.lists(children, max_size=5)
                | st.dictionaries(
                    st.sampled_from(sorted(_announce_dict()) + sorted(_reply_dict())), children, max_size=8
                )
            ),
            max_leaves=30,
        ).map(lambda obj: msgpack.packb(obj)),
        st.fixed_dictionaries(
            {k: st.sampled_from([v, None, 0, "x", b"x", [], {}, True, -1, 2.5]) for k, v in _announce_dict().items()}
        ).map(msgpack.packb),
        st.fixed_dictionaries(
            {
                k: st.sampled_from([v, None, 0, "x", b"x", [], [_HOLDER], {}, True, -1, 2.5])
                for k, v in _reply_dict().items()
            }
        ).map(msgpack.packb),
        st.fixed_dictionaries(
            {
                k: st.sampled_from([v, None, 0, "x", b"x", [], [_COMPACT_HOLDER], [_COMPACT_LESSEE], [_HOLDER], {},
                                    True, False, -1, 2.5])
                for k, v in _reply_dict(compact=True, site="s", holders=[_COMPACT_HOLDER],
                                        lessees=[_COMPACT_LESSEE]).items()
            }
        ).map(msgpack.packb),
    )
)
def test_decode_never_raises_anything_but_message_error(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    assert isinstance(message, Announce | Reply)
    assert decode(encode(message)) == message


# ---- planning: bitmaps ----------------------------------------------------------------


def test_bitmap_operations() -> None:
    bitmap = Bitmap(11)
    assert bitmap.to_bytes() == b"\x00\x00" and bitmap.cardinality() == 0 and not bitmap.is_full()
    for index in (0, 1, 2, 5, 10):
        bitmap.set(index)
    bitmap.set(5)  # idempotent
    assert bitmap.indexes() == [0, 1, 2, 5, 10]
    assert bitmap.cardinality() == 5 and bitmap.prefix() == 3
    assert bitmap.to_bytes() == bytes([0b11100100, 0b00100000])
    assert 5 in bitmap and 4 not in bitmap and 11 not in bitmap and -1 not in bitmap and "5" not in bitmap
    assert Bitmap(11, bitmap.to_bytes()) == bitmap and Bitmap(11) != bitmap and Bitmap(12) != Bitmap(11)
    with pytest.raises(IndexError):
        bitmap.set(11)
    with pytest.raises(IndexError):
        bitmap.set(-1)
    with pytest.raises(ValueError):
        Bitmap(11, b"\x00")  # wrong length for 11 chunks
    with pytest.raises(ValueError):
        Bitmap(-1)
    # Bits beyond the count are cleared, so a peer cannot claim chunks that do not exist.
    padded = Bitmap(11, b"\xff\xff")
    assert padded.is_full() and padded.cardinality() == 11 and padded.to_bytes() == b"\xff\xe0"
    full = Bitmap.full(11)
    assert full == padded and full.prefix() == 11 and full.indexes() == list(range(11))
    empty = Bitmap(0)
    assert empty.is_full() and empty.to_bytes() == b"" and Bitmap.full(0) == empty
    assert repr(bitmap) == "Bitmap(5/11)"


def test_bitmap_masks_combine_bitmaps_and_round_trip() -> None:
    a, b = Bitmap(11), Bitmap(11)
    for index in (0, 3, 10):
        a.set(index)
    for index in (3, 4):
        b.set(index)
    assert Bitmap.from_mask(11, a.mask()) == a
    assert Bitmap.from_mask(11, a.mask() | b.mask()).indexes() == [0, 3, 4, 10]
    assert Bitmap.from_mask(11, a.mask() & b.mask()).indexes() == [3]
    assert Bitmap.from_mask(11, a.mask() & ~b.mask()).indexes() == [0, 10]  # a negative mask
    assert Bitmap.from_mask(11, ~0) == Bitmap.full(11)  # bits beyond the count dropped
    assert Bitmap.from_mask(0, ~0) == Bitmap(0)
    # Built from indexes at once, those past either end left out, each set once.
    assert Bitmap.of(11, [10, 0, 3, 3, -1, 11]) == a
    assert Bitmap.of(0, [0]) == Bitmap(0)


def test_bitmap_queries_match_a_test_of_every_chunk() -> None:
    # indexes, missing, cardinality and prefix work a byte at a time: checked against the
    # definition (a test per chunk) on counts around byte edges and random contents.
    rng = random.Random(7)
    for count in [*range(0, 34), 96, 1000, 2048]:
        for _ in range(8):
            present = {index for index in range(count) if rng.random() < rng.random()}
            bitmap = _bitmap(count, sorted(present))
            assert bitmap.indexes() == sorted(present)
            assert bitmap.missing() == [index for index in range(count) if index not in present]
            assert bitmap.cardinality() == len(present) and bitmap.is_full() == (len(present) == count)
            prefix = 0
            while prefix < count and prefix in present:
                prefix += 1
            assert bitmap.prefix() == prefix


# ---- planning: rarest first, randomness, caps, locality, fallback ---------------------


def _bitmap(count: int, indexes: list[int]) -> Bitmap:
    bitmap = Bitmap(count)
    for index in indexes:
        bitmap.set(index)
    return bitmap


def test_rarest_chunks_are_requested_first() -> None:
    # Chunk 0 is held by 4 sources, chunk 1 by 3, chunk 2 by 2, chunk 3 by 1 (and chunk 4 by nobody).
    sources = {f"p{i}": _bitmap(5, [c for c in range(4) if c < 4 - i]) for i in range(4)}
    plan = plan_requests(range(5), sources, busy={}, max_per_source=10, limit=10, rng=random.Random(1))
    assert [r.index for r in plan] == [0, 1, 2, 3][::-1]
    assert plan[0] == ChunkRequest(3, "p0")  # the only holder of chunk 3
    assert all(r.index in sources[r.source] for r in plan)
    # A chunk nobody has is not planned, and the limit cuts the least rare ones.
    assert [
        r.index for r in plan_requests(range(5), sources, busy={}, max_per_source=10, limit=2, rng=random.Random(1))
    ] == [3, 2]


def test_equally_rare_chunks_and_sources_are_chosen_at_random() -> None:
    sources = {f"p{i}": Bitmap.full(32) for i in range(4)}

    def plan(seed: int) -> list[ChunkRequest]:
        return plan_requests(range(32), sources, busy={}, max_per_source=2, limit=8, rng=random.Random(seed))

    assert plan(3) == plan(3)  # a seeded rng makes it reproducible
    firsts = Counter(plan(seed)[0].index for seed in range(400))
    assert len(firsts) >= 25, "every equally rare chunk should come first sometimes"
    assert max(firsts.values()) < 40
    chosen = Counter(request.source for seed in range(100) for request in plan(seed))
    assert set(chosen) == set(sources) and all(count == 200 for count in chosen.values())  # 2 each, every time


def test_a_transfer_keeps_the_bytes_of_its_request_slots_in_flight_not_their_count() -> None:
    """A node's requests in flight share its downlink, so each chunk takes about as long as all
    of them: 16 chunks of 512 KiB at 3 Mbit/s are 22 s a chunk, the reader's first one included.
    Up to 128 KiB a chunk takes a slot; bigger ones take as many as their bytes, never fewer than
    4 slots in all (several peers sending at once)."""
    assert request_slots(64 * 1024, 16) == 16  # the matrix's small layers: unchanged
    assert request_slots(128 * 1024, 16) == 16
    assert request_slots(256 * 1024, 16) == 8
    assert request_slots(512 * 1024, 16) == 4
    assert request_slots(2**20, 16) == 4  # the floor
    assert request_slots(64 * 1024, 2) == 2 and request_slots(2**20, 2) == 2  # the configured number bounds
    assert request_slots(256 * 1024, 32) == 16  # a larger configured number keeps its bytes


def test_planning_a_large_blob_stops_when_every_source_is_at_its_cap() -> None:
    # Planned after every chunk that arrives: the holder at its cap of 2 after two of 4,095
    # equally rare chunks; the peer then gets the one chunk it has (less rare: two holders).
    count = 4096
    sources = {"holder": Bitmap.full(count), "peer": _bitmap(count, [5])}
    plan = plan_requests(range(count), sources, busy={}, max_per_source=2, limit=16, rng=random.Random(2))
    assert len(plan) == 3 and plan[2] == ChunkRequest(5, "peer")
    assert all(r.source == "holder" and r.index != 5 for r in plan[:2])
    firsts = {plan_requests(range(count), {"holder": Bitmap.full(count)}, busy={}, max_per_source=1, limit=1,
                            rng=random.Random(seed))[0].index for seed in range(50)}
    assert len(firsts) > 40  # not the same few chunks every time


def test_per_source_caps_and_busy_requests_are_respected() -> None:
    sources = {"a": Bitmap.full(20), "b": Bitmap.full(20), "c": Bitmap.full(20)}
    plan = plan_requests(range(20), sources, busy={"a": 1, "c": 2}, max_per_source=2, limit=20, rng=random.Random(5))
    per_source = Counter(r.source for r in plan)
    assert per_source == {"a": 1, "b": 2}
    assert len({r.index for r in plan}) == len(plan)  # never the same chunk twice
    assert plan_requests(range(20), sources, busy={"a": 2, "b": 2, "c": 2}, max_per_source=2, limit=20) == []
    assert len(plan_requests(range(20), sources, busy={}, max_per_source=2, limit=4, rng=random.Random(0))) == 4
    assert plan_requests([], sources, busy={}, max_per_source=2, limit=4) == []
    assert plan_requests(range(20), {}, busy={}, max_per_source=2, limit=4) == []
    # Sources are balanced: the least loaded holder of a chunk is picked.
    balanced = plan_requests(range(6), sources, busy={}, max_per_source=2, limit=6, rng=random.Random(2))
    assert Counter(r.source for r in balanced) == {"a": 2, "b": 2, "c": 2}


def test_same_site_sources_are_preferred() -> None:
    sources = {
        "near": Bitmap.full(10),
        "far1": Bitmap.full(10),
        "far2": Bitmap.full(10),
        "near-partial": _bitmap(10, [7]),
    }
    for seed in range(50):
        plan = plan_requests(
            range(10),
            sources,
            busy={},
            max_per_source=2,
            limit=6,
            preferred=["near", "near-partial"],
            rng=random.Random(seed),
        )
        by_source = Counter(r.source for r in plan)
        # Near sources get every request they can take before any far source gets one.
        assert by_source["near"] == 2
        assert by_source["far1"] + by_source["far2"] == 6 - 2 - by_source["near-partial"]
        assert all(r.index == 7 for r in plan if r.source == "near-partial")
    # A chunk only a far source has still comes from there.
    plan = plan_requests(
        [3],
        {"far": Bitmap.full(10), "near": _bitmap(10, [1])},
        busy={},
        max_per_source=2,
        limit=4,
        preferred=["near"],
        rng=random.Random(0),
    )
    assert plan == [ChunkRequest(3, "far")]


def test_fallback_source_is_used_only_for_chunks_nobody_else_has() -> None:
    # The lease holder ("lessee") will have everything; peers hold chunks 0..3.
    sources = {"lessee": Bitmap.full(8), "p1": _bitmap(8, [0, 1, 2, 3]), "p2": _bitmap(8, [0, 1, 2, 3])}
    for seed in range(50):
        plan = plan_requests(
            range(8), sources, busy={}, max_per_source=8, limit=8, fallback=["lessee"], rng=random.Random(seed)
        )
        assert len(plan) == 8
        for request in plan:
            if request.index < 4:
                assert request.source in ("p1", "p2")
            else:
                assert request.source == "lessee"
    # Even when the other holders are at their cap, the fallback is spared for chunks they have.
    plan = plan_requests(
        range(8), sources, busy={"p1": 2, "p2": 2}, max_per_source=2, limit=8, fallback=["lessee"], rng=random.Random(0)
    )
    assert len(plan) == 2 and {r.index for r in plan} <= {4, 5, 6, 7} and {r.source for r in plan} == {"lessee"}
    # Rarity ignores the fallback: chunks only it has count as the rarest.
    plan = plan_requests(
        range(8), sources, busy={}, max_per_source=8, limit=3, fallback=["lessee"], rng=random.Random(0)
    )
    assert all(r.index >= 4 for r in plan)


def _reference_plan(needed: list[int], sources: dict[str, Bitmap], *, busy: dict[str, int], max_per_source: int,
                    limit: int, preferred: list[str], fallback: list[str], rng: random.Random) -> list[ChunkRequest]:
    """Who holds which chunk and how rare it is, as the planner first worked it out (a list of
    holders per chunk: the specification): ``plan_requests`` now counts holders bit-sliced over
    whole bitmaps and must hand its draw (``_draw``, shared) the same groups and holders. Each
    group in ascending order, as the bitmaps give them (the first version took the order its
    dictionaries happened to have)."""
    load = dict(busy)
    wanted = set(needed)
    holders: dict[int, list[str]] = {}
    spare: dict[int, list[str]] = {}
    for node, bitmap in sources.items():
        table = spare if node in fallback else holders
        for index in sorted(wanted.intersection(bitmap.indexes())):
            table.setdefault(index, []).append(node)
    for index, nodes in spare.items():
        holders.setdefault(index, nodes)
    by_rarity: dict[int, list[int]] = {}
    for index, nodes in holders.items():
        by_rarity.setdefault(len(nodes), []).append(index)
    open_sources = {node for node in sources if load.get(node, 0) < max_per_source}
    groups = (sorted(by_rarity[rarity]) for rarity in sorted(by_rarity))
    return _draw(groups, holders.__getitem__, load=load, open_sources=open_sources, preferred=set(preferred),
                 max_per_source=max_per_source, limit=limit, rng=rng)


def test_the_planner_chooses_as_its_first_version_did_on_random_swarms() -> None:
    """Rarest first, random among equals, caps, same site first, the fallback only for chunks no
    one else has: 600 random swarms (1-40 sources, 1-700 chunks, some busy, some preferred, a
    fallback or none), each planned by both with the same seed, give the same requests."""
    cases = random.Random(11)
    for case in range(600):
        count = cases.choice([1, 7, 8, 9, 64, 128, 192, 700])
        names = [f"n{i}" for i in range(cases.randint(1, 40))]
        sources = {name: _bitmap(count, [i for i in range(count) if cases.random() < cases.choice([0.05, 0.5, 1.0])])
                   for name in names}
        needed = [i for i in range(count + 2) if cases.random() < 0.6]  # past the end too: never planned
        busy = {name: cases.randint(0, 3) for name in names if cases.random() < 0.3}
        preferred = [name for name in names if cases.random() < 0.5]
        fallback = [cases.choice(names)] if cases.random() < 0.5 else []
        options = {"busy": busy, "max_per_source": cases.randint(1, 4), "limit": cases.randint(0, 20),
                   "preferred": preferred, "fallback": fallback}
        planned = plan_requests(needed, sources, rng=random.Random(case), **options)  # type: ignore[arg-type]
        assert planned == _reference_plan(needed, sources, rng=random.Random(case), **options), case  # type: ignore[arg-type]


def test_a_range_holder_is_asked_for_its_next_chunks_as_far_ahead_as_its_share_of_the_upstream() -> None:
    """What it has plus the next chunks of its range; the sole holder 8 ahead, each of 16 holders
    (each fetching at 1/16 of the upstream) one ahead; never past its range."""
    known = Bitmap(64)
    for index in (16, 17, 19):
        known.set(index)
    assert lessee_view(known, 64, 16, 31, 1).indexes() == list(range(16, 18 + LESSEE_LOOKAHEAD))  # 18..25
    assert lessee_view(known, 64, 16, 31, 16).indexes() == [16, 17, 18, 19]
    assert lessee_view(known, 64, 16, 31, 3).indexes() == [16, 17, 18, 19]  # 8 // 3 = 2: 18 and 19
    assert lessee_view(None, 64, 60, 63, 1).indexes() == [60, 61, 62, 63]  # not past its range
    assert lessee_view(known, 64, 0, 3, 0).indexes() == [0, 1, 2, 3, 16, 17, 19]  # no lessee count: as one


# ---- coordinator ----------------------------------------------------------------------

TTL = 15.0


_SMALL_CHUNK = 64 * 1024


def _node_announce(
    node: str,
    *,
    site: str = "s1",
    have: bytes | None = b"\x00",
    complete: bool = False,
    want_lease: bool = True,
    gone: bool = False,
    leased: bool = False,
    digest: Digest = DIGEST,
    ranges: tuple[tuple[int, int], ...] = (),
) -> Announce:
    have = None if complete else have
    # Eight chunks of 64 KiB: small enough that the site's split is set by max_ranges, not by the
    # bytes in flight (site_split).
    return Announce(digest, node, f"{node}:7000", site, 8 * _SMALL_CHUNK, _SMALL_CHUNK, complete, have, want_lease,
                    gone, leased, ranges=ranges)


def test_exactly_one_lease_per_digest_and_site_among_concurrent_requesters() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    replies = {f"n{i}": state.announce(_node_announce(f"n{i}"), 100.0) for i in range(50)}
    granted = [node for node, reply in replies.items() if reply.granted]
    assert granted == ["n0"]
    assert all(reply.lease_holder == "n0" and reply.lease_address == "n0:7000" for reply in replies.values())
    assert all(reply.lease_ttl == TTL for reply in replies.values())
    # Every later requester (and a repeat from the holder) sees the same single lease.
    for step in range(1, 10):
        for node in ("n0", "n7", "n49"):
            reply = state.announce(_node_announce(node), 100.0 + step)
            assert reply.lease_holder == "n0" and reply.granted == (node == "n0")
    assert state.leases_granted == 1
    # Holders come back in the reply (not the asker itself).
    reply = state.announce(_node_announce("n3"), 111.0)
    assert {p.node for p in reply.holders} == {f"n{i}" for i in range(50)} - {"n3"}


def test_lease_moves_after_expiry_when_its_holder_stops_announcing() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("a"), 0.0).granted
    # The holder keeps announcing progress: the lease stays, however long the fetch takes.
    for step, t in enumerate(range(10, 80, 10), 1):
        progress = ((1 << step) - 1).to_bytes(1, "big")  # one more of the 8 chunks each time
        assert state.announce(_node_announce("a", have=progress, want_lease=False), float(t)).lease_holder == "a"
        assert not state.announce(_node_announce("b"), t + 0.5).granted
    # The holder dies after its announcement at t=70: the lease is its until 70 + TTL.
    assert state.announce(_node_announce("b"), 70 + TTL - 0.01).lease_holder == "a"
    reply = state.announce(_node_announce("b"), 70 + TTL + 0.01)
    assert reply.granted and reply.lease_holder == "b"
    assert state.announce(_node_announce("c"), 86.0).lease_holder == "b"
    assert state.leases_granted == 2


def test_a_coordinator_taking_over_a_transfer_in_progress_lets_the_lease_holder_reclaim_it() -> None:
    """A new coordinator (its predecessor died) first hears of the digest from nodes that hold chunks."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    some = bytes([0b11110000])
    # Other downloaders reach it first: none of them gets a lease while the holder may still claim it.
    for t in (0.0, 1.0, 5.0):
        reply = state.announce(_node_announce("b", have=some), t)
        assert not reply.granted and reply.lease_holder is None
    # The holder announces (well within the TTL) and gets its lease back at once.
    reply = state.announce(_node_announce("a", have=bytes([0b11111100]), leased=True), 5.5)
    assert reply.granted and reply.lease_holder == "a"
    assert state.announce(_node_announce("b", have=some), 6.0).lease_holder == "a"
    assert state.leases_granted == 1

    # If the holder died too, the lease goes to a downloader once the takeover period is over.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert not state.announce(_node_announce("b", have=some), 0.0).granted
    assert not state.announce(_node_announce("c", have=some), TTL - 0.1).granted
    reply = state.announce(_node_announce("c", have=some), TTL)
    assert reply.granted and reply.lease_holder == "c"

    # A digest first heard of from a node without chunks is a new transfer: the lease is granted at once.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("b", have=bytes(1)), 0.0).granted
    # And a claim never takes over a live lease of another node.
    reply = state.announce(_node_announce("z", have=some, leased=True), 1.0)
    assert not reply.granted and reply.lease_holder == "b"


def test_a_coordinator_taking_over_gives_each_range_holder_back_its_own_range() -> None:
    """Four ranges of two chunks; holders of ranges 2 and 0 (half fetched) reach a new coordinator
    that has no state. Each gets back the range it names, not the first free one (which another
    node would then fetch a second time); nobody gets a free range until the takeover is over."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    assert not state.announce(_node_announce("b", have=bytes([0b00110000])), 0.0).granted  # a downloader
    reply = state.announce(_node_announce("c", have=bytes([0b00001000]), leased=True, ranges=((4, 5),)), 1.0)
    assert reply.granted and reply.ranges == ((4, 5),)
    # A holder naming a range that another holder got back first, or one not of this split, gets nothing.
    assert not state.announce(_node_announce("d", have=bytes(1), leased=True, ranges=((4, 5),)), 1.5).granted
    assert not state.announce(_node_announce("d", have=bytes(1), leased=True, ranges=((3, 6),)), 1.6).granted
    reply = state.announce(_node_announce("a", have=bytes([0b10000000]), leased=True, ranges=((0, 1),)), 2.0)
    assert reply.granted and reply.ranges == ((0, 1),)
    assert {(lease.node, lease.first) for lease in reply.lessees} == {("a", 0), ("c", 4)}
    # Range 1 is in the site (b has chunks 2-3); range 3 is free: granted once the takeover is over.
    assert not state.announce(_node_announce("b", have=bytes([0b00110000])), TTL - 0.1).granted
    reply = state.announce(_node_announce("b", have=bytes([0b00110000])), TTL + 0.1)
    assert reply.granted and reply.ranges == ((6, 7),)
    # A reclaimed lease lives like any other: renewed on progress, ended when its range is in.
    reply = state.announce(_node_announce("c", have=bytes([0b00001000]), leased=True, ranges=((4, 5),)), 10.0)
    assert reply.granted and reply.ranges == ((4, 5),)
    reply = state.announce(_node_announce("c", have=bytes([0b00001100]), leased=True, ranges=((4, 5),)), TTL + 1)
    assert not reply.granted and {lease.first for lease in reply.lessees} == {0, 6}


def test_a_coordinator_taking_over_a_site_whose_upstream_ignores_range_gives_the_front_holder_the_one_range() -> None:
    """The old coordinator died before it told the holder of the range from chunk 0 that the
    split became one range: the holder names its old range (it reads the blob to its end). A new
    coordinator told by another node that the upstream ignores Range gives it the one range
    back, rather than granting it to a node that would fetch the blob a second time."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    reply = state.announce(replace(_node_announce("c", have=bytes(1), leased=True, ranges=((4, 5),)),
                                   whole_blob=True), 1.0)
    assert not reply.granted  # its range is gone with the split
    reply = state.announce(replace(_node_announce("a", have=bytes([0b11100000]), leased=True, ranges=((0, 1),)),
                                   whole_blob=True), 1.5)
    assert reply.granted and reply.ranges == ((0, 7),)
    assert not state.announce(_node_announce("d", have=bytes(1)), TTL + 0.1).granted  # a holds it


def test_a_coordinator_that_a_joining_node_reached_first_takes_over_when_the_running_transfer_reaches_it() -> None:
    """A node joins mid-pull, the digest's coordinator moves to it, and it announces first, with
    nothing: a new transfer as far as the state knows. The nodes already fetching ranges under
    the old coordinator reach it next (CI, 12-04: a0 and a2 were given ranges a1 was fetching,
    and the seed sent 1.12x the blob). From the first of them, no free range is granted for a
    lease TTL, and each gets back the range it names."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    reply = state.announce(_node_announce("newcomer", have=bytes(1)), 0.0)
    assert reply.granted and reply.ranges == ((0, 1),)  # all it could know
    # a fetched ranges 0 and 1 (in the site now) and was given range 2 by the old coordinator.
    reply = state.announce(_node_announce("a", have=bytes([0b11110000]), leased=True, ranges=((4, 5),)), 0.5)
    assert reply.granted and reply.ranges == ((4, 5),)
    # b is fetching range 3 and has not reached this coordinator yet (its view of the members
    # lags): nobody else gets range 3 meanwhile, not even a node asking without a range.
    assert not state.announce(_node_announce("c", have=bytes([0b11000000])), 1.0).granted
    assert not state.announce(_node_announce("newcomer", have=bytes(1)), 2.0).granted  # its range is in (a had it)
    reply = state.announce(_node_announce("b", have=bytes([0b00000010]), leased=True, ranges=((6, 7),)), 3.0)
    assert reply.granted and reply.ranges == ((6, 7),)
    assert state.leases_granted == 3
    # The takeover lasts a lease TTL from the first node that came from elsewhere (a at 0.5);
    # the newcomer's range is in the site (a had it), so its lease ended.
    reply = state.announce(_node_announce("newcomer", have=bytes([0b11000000]), leased=True, ranges=((0, 1),)),
                           0.5 + TTL - 0.1)
    assert not reply.granted
    assert not state.announce(_node_announce("c", have=bytes([0b11000000])), 0.5 + TTL - 0.1).granted
    state.announce(_node_announce("a", have=bytes([0b11111100]), leased=True, ranges=((4, 5),)), 0.5 + TTL)
    state.announce(_node_announce("b", have=bytes([0b00000011]), leased=True, ranges=((6, 7),)), 0.5 + TTL)
    assert not state.announce(_node_announce("c", have=bytes([0b11000000])), 0.5 + TTL + 0.1).granted  # all in


def test_a_coordinator_that_a_joining_node_moved_the_digest_to_starts_from_what_the_previous_one_knew() -> None:
    """A node joins mid-pull and outranks the digest's coordinator: its state is empty, and the
    first announcement it handles may be its own, with nothing (CI, 12-04: it granted itself ranges
    the others were fetching; the seed sent 1.12x the blob). It asks the member ranked next, which
    answers with what it knows and grants no range for a lease TTL; the new state starts from the
    answer, so the joiner is granted the first range that is neither in the site nor leased."""
    # The old coordinator's node is outranked by the newcomer for this digest.
    old_node = next(f"old-{i}" for i in range(100)
                    if rendezvous.rank(str(DIGEST), ["newcomer", f"old-{i}"])[0] == "newcomer")
    old = CoordinatorState(lease_ttl=TTL, max_ranges=4, node_id=old_node)
    assert old.announce(_node_announce("a"), 0.0).ranges == ((0, 1),)
    assert old.announce(_node_announce("b"), 0.1).ranges == ((2, 3),)
    # a fetched range 0 and was given range 2.
    assert old.announce(_node_announce("a", have=bytes([0b11000000]), leased=True, ranges=((0, 1),)), 1.0).ranges \
        == ((4, 5),)
    assert not old.knows(DIGEST_B)
    question = replace(_node_announce("newcomer", have=None, want_lease=False), handoff=True)
    # A digest it does not know is not created by the question.
    assert old.announce(replace(question, digest=DIGEST_B), 1.4) == Reply((), None, None, False, TTL)
    assert not old.knows(DIGEST_B)
    answer = old.announce(question, 1.5)
    assert not answer.granted and {p.node for p in answer.holders} == {"a", "b"}
    assert {(lease.node, lease.first) for lease in answer.lessees} == {("a", 4), ("b", 2)}
    # The old coordinator grants nothing more (b, done with its range, asks it before it learns
    # of the newcomer), until a lease TTL has passed.
    assert not old.announce(_node_announce("b", have=bytes([0b00110000]), leased=True, ranges=((2, 3),)),
                            2.0).granted
    assert old.announce(_node_announce("c"), 1.5 + TTL + 0.1).granted
    # A node ranked below this one asks (it got announcements from a node whose view of the
    # members lacks this one): it learns what is known here, and this state goes on granting.
    lower = next(f"low-{i}" for i in range(100) if rendezvous.rank(str(DIGEST), [f"low-{i}", old_node])[0] == old_node)
    assert old.announce(replace(question, node=lower), 20.0).lessees
    assert old.announce(_node_announce("d"), 20.1).granted

    new = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    new.adopt(_node_announce("newcomer", have=bytes(1)), answer, 1.6)
    reply = new.announce(_node_announce("newcomer", have=bytes(1)), 1.7)
    assert reply.granted and reply.ranges == ((6, 7),)  # range 0 is in (a has it); 1 and 2 are leased
    assert {p.node for p in reply.holders} == {"a", "b"}
    # The old leases live on here: renewed by their holders' progress, no takeover pause.
    reply = new.announce(_node_announce("a", have=bytes([0b11100000]), leased=True, ranges=((4, 5),)), 2.5)
    assert reply.granted and reply.ranges == ((4, 5),)
    reply = new.announce(_node_announce("b", have=bytes([0b00110000]), leased=True, ranges=((2, 3),)), 3.0)
    assert not reply.granted  # its range is in, and none is free
    assert new.leases_granted == 1
    # An answer with nothing in it (a new transfer) leaves the state to be made as usual.
    fresh = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    fresh.adopt(_node_announce("x"), Reply((), None, None, False, TTL), 0.0)
    assert not fresh.knows(DIGEST) and fresh.announce(_node_announce("x"), 0.0).ranges == ((0, 1),)


def test_a_lease_holder_that_makes_no_progress_loses_the_lease() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("a", have=b"\x00"), 0.0).granted
    # It keeps announcing, but its bitmap never grows: the lease ends TTL after the grant.
    for t in (5.0, 10.0, 14.0):
        assert state.announce(_node_announce("a", have=b"\x00", leased=True), t).lease_holder == "a"
    assert state.announce(_node_announce("a", have=b"\x00", leased=True), 20.0).lease_holder == "a"
    reply = state.announce(_node_announce("b"), 14.0 + TTL + 0.01)
    assert reply.granted and reply.lease_holder == "b"
    # The one that does progress keeps it past TTL.
    for step, t in enumerate((35.0, 45.0, 55.0), 1):
        have = ((1 << step) - 1).to_bytes(1, "big")
        assert state.announce(_node_announce("b", have=have, leased=True), t).lease_holder == "b"
    assert not state.announce(_node_announce("c"), 56.0).granted


def test_false_claims_are_disputed_and_stop_holding_up_the_site() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    # A liar claims a complete copy: no lease for its site...
    state.announce(_node_announce("liar", complete=True), 0.0)
    assert not state.announce(_node_announce("x"), 1.0).granted
    # ...until a node that asked it for chunks (and got "not here") says so.
    reply = state.announce(_announce_disputing("x", "liar"), 2.0)
    assert reply.granted and reply.lease_holder == "x"
    assert "liar" not in {p.node for p in reply.holders}
    assert state.disputes == 1
    # While distrusted, its claims do not count, even if it repeats them.
    state.announce(_node_announce("liar", complete=True), 3.0)
    assert "liar" not in {p.node for p in state.announce(_node_announce("y", want_lease=False), 4.0).holders}
    # A disputed lease holder loses the lease at once; it cannot take it back while distrusted.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("lazy"), 0.0).granted
    reply = state.announce(_announce_disputing("x", "lazy"), 1.0)
    assert reply.granted and reply.lease_holder == "x"
    assert not state.announce(_node_announce("lazy", leased=True), 2.0).granted
    # Distrust is short: after it, the node's announcements count again.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    state.announce(_node_announce("n1", complete=True), 0.0)
    state.announce(_announce_disputing("x", "n1", want_lease=False), 1.0)
    state.announce(_node_announce("n1", complete=True), 1.0 + TTL + 1)
    assert "n1" in {p.node for p in state.announce(_node_announce("y"), 2.0 + TTL).holders}
    # Disputing oneself or a node the coordinator does not know changes nothing.
    before = state.disputes
    state.announce(_announce_disputing("y", "y"), 3.0 + TTL)
    state.announce(_announce_disputing("y", "nobody"), 3.0 + TTL)
    assert state.disputes == before


def test_a_finished_range_its_holder_took_away_is_granted_again() -> None:
    """A range is done once its holder has it all; the holder may die before any peer copied a
    chunk of it. Disputed (it stopped answering), its range is reopened unless the site's other
    holders cover it. Before, the range stayed done and the chunks only it held waited for
    stuck_after at every reader: a CI run's pulls stalled past stall_timeout and failed."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    assert [state.announce(_ranged(n, 12), 0.0).ranges for n in ("n0", "n1", "n2")] == [((0, 3),), ((4, 7),),
                                                                                          ((8, 11),)]
    assert state.announce(_ranged("n0", 12, set(range(4))), 1.0).ranges == ()  # done, nothing left to grant
    assert not state.announce(_ranged("n3", 12), 1.5).granted
    # n1 copied chunks 0 and 1 of it (and says so), then n0 dies before anyone copied 2 and 3.
    state.announce(_ranged("n1", 12, {0, 1}, leased=True), 2.0)
    reply = state.announce(replace(_ranged("n2", 12, leased=True), disputed=("n0",), ranges=((8, 11),)), 3.0)
    assert reply.ranges == ((8, 11),)  # n2 keeps its own range
    reply = state.announce(_ranged("n3", 12), 3.5)
    assert reply.granted and reply.ranges == ((0, 3),)
    # A lost holder whose range others hold: nothing reopened.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    state.announce(_ranged("n0", 12), 0.0)
    for node in ("n1", "n2"):
        state.announce(_ranged(node, 12, want_lease=False), 0.1)  # known here (else they took over from elsewhere)
    state.announce(_ranged("n0", 12, set(range(4))), 1.0)
    state.announce(_ranged("n1", 12, {0, 1}, want_lease=False), 1.5)
    state.announce(_ranged("n2", 12, {2, 3}, want_lease=False), 1.6)
    state.announce(replace(_ranged("n2", 12, {2, 3}, want_lease=False), disputed=("n0",)), 2.0)
    assert state.announce(_ranged("n3", 12), 2.5).ranges == ((4, 7),)
    # A holder that leaves (gone) is a lost holder too; a holder of another site covers nothing here.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    state.announce(_ranged("n0", 12), 0.0)
    state.announce(_ranged("n0", 12, set(range(4))), 1.0)
    state.announce(_ranged("m0", 12, site="s2", want_lease=False), 0.1)
    state.announce(_ranged("m0", 12, set(range(4)), site="s2", want_lease=False), 1.2)
    state.announce(_ranged("n0", 12, gone=True), 2.0)
    assert state.announce(_ranged("n3", 12), 2.5).ranges == ((0, 3),)


def test_a_backup_without_state_does_not_grant_the_ranges_its_askers_know_are_leased() -> None:
    """The coordinator of a pull at N = 32 timed out for some nodes (its uplink full, its CPU
    shared by 32 agents) and they announced to the backup, which had no state and could not
    reach the coordinator for a hand-off either. The first of them had no chunks yet, so the
    backup did not know a pull was running and granted ranges 0-27 again (seed egress 1.44x).
    Now each announcement lists the site's leases its node knows; the backup takes over with
    them, and they last a lease TTL past the takeover while their holders announce elsewhere."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    known = (RangeLease("n0", "n0:7000", 0, 3), RangeLease("n1", "n1:7000", 4, 7))
    reply = state.announce(replace(_ranged("x", 12), lessees=known), 0.0)
    assert not reply.granted  # taking over: nothing granted but what a holder names as its own
    assert [(lease.node, lease.first) for lease in reply.lessees] == [("n0", 0), ("n1", 4)]
    reply = state.announce(_ranged("y", 12), TTL + 0.5)  # after the takeover: a free range only
    assert reply.ranges == ((8, 11),)
    assert state.announce(_ranged("z", 12), TTL + 1.0).ranges == ()
    # A lease heard of (its holder never announced here) ends a TTL after the takeover.
    assert state.announce(_ranged("z", 12), 2 * TTL + 0.5).ranges == ((0, 3),)
    # A coordinator that has state ignores the lists (its own leases are the truth): a lease it
    # released is not brought back by a node that still lists it.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    assert state.announce(_ranged("n0", 12), 0.0).ranges == ((0, 3),)
    state.announce(_ranged("a", 12, want_lease=False), 0.1)
    # n0 stopped answering: released, and granted to b.
    assert state.announce(replace(_ranged("b", 12), disputed=("n0",)), 1.0).ranges == ((0, 3),)
    reply = state.announce(replace(_ranged("a", 12), lessees=(RangeLease("n0", "n0:7000", 0, 3),)), 1.5)
    assert reply.ranges == ((4, 7),)
    assert [(lease.node, lease.first) for lease in reply.lessees] == [("b", 0), ("a", 4)]


def test_a_takeover_whose_predecessor_is_gone_ends_once_every_live_holder_could_have_named_its_ranges() -> None:
    """The digest's coordinator was killed, and its successor's hand-off found nothing answering
    there (churn, 12-06: the successor granted no range for a lease TTL, and the last node took
    27 s instead of 16-18). Nobody can be announcing to a dead coordinator, and a range holder
    announces at least every lease TTL / 3: after that (and a slack) the free ranges, and those
    whose holders never named them here (they died too), are granted; a live holder keeps its own.
    A hand-off that timed out (the predecessor may be overloaded, still granting) keeps the full
    takeover."""
    span = TTL / 3 + 2.0
    known = (RangeLease("dead", "dead:7000", 0, 1), RangeLease("live", "live:7000", 2, 3))
    for gone in (True, False):
        state = CoordinatorState(lease_ttl=TTL, max_ranges=4)  # ranges 0-1, 2-3, 4-5, 6-7
        reply = state.announce(replace(_node_announce("b"), lessees=known), 0.0, predecessor_gone=gone)
        assert not reply.granted  # taking over
        reply = state.announce(_node_announce("live", have=bytes([0b00100000]), leased=True, ranges=((2, 3),)),
                               1.0)
        assert reply.granted and reply.ranges == ((2, 3),)  # its own, back at once
        assert not state.announce(_node_announce("c"), span - 0.1).granted
        reply = state.announce(_node_announce("c"), span + 0.1)
        if not gone:
            assert not reply.granted  # a lease TTL; then a free range, the dead holder's a TTL later
            assert state.announce(_node_announce("c"), TTL + 0.1).ranges == ((4, 5),)
            continue
        # The dead holder's range first (it never named it here), then the ranges nobody had.
        assert reply.granted and reply.ranges == ((0, 1),)
        assert state.announce(_node_announce("d"), span + 0.2).ranges == ((4, 5),)
        assert state.announce(_node_announce("e"), span + 0.3).ranges == ((6, 7),)
        reply = state.announce(_node_announce("live", have=bytes([0b00110000]), leased=True, ranges=((2, 3),)),
                               span + 0.4)
        assert not reply.granted  # its range is in (bits 2 and 3): done, not given to anyone else
        assert {(lease.node, lease.first) for lease in reply.lessees} == {("c", 0), ("d", 4), ("e", 6)}
    # Given when the state is made; a state that exists already keeps its takeover.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=4)
    state.announce(replace(_node_announce("b"), lessees=known), 0.0)
    assert not state.announce(_node_announce("c"), span + 0.1, predecessor_gone=True).granted


def _announce_disputing(node: str, *disputed: str, want_lease: bool = True) -> Announce:
    message = _node_announce(node, want_lease=want_lease)
    return Announce(message.digest, message.node, message.address, message.site, message.size, message.chunk_size,
                    False, message.have, want_lease, False, False, disputed)


def test_blobs_split_into_ranges_of_at_least_a_few_chunks() -> None:
    assert split_ranges(12, 16) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    assert split_ranges(12, 3) == [(0, 3), (4, 7), (8, 11)]
    assert split_ranges(1, 16) == [(0, 0)] and split_ranges(3, 16) == [(0, 2)] and split_ranges(0, 16) == []
    assert split_ranges(100, 1) == [(0, 99)]
    for count in (5, 37, 100, 1000):
        ranges = split_ranges(count, 16)
        covered = [i for first, last in ranges for i in range(first, last + 1)]
        assert covered == list(range(count))  # disjoint, in order, everything
        sizes = {last - first + 1 for first, last in ranges}
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= min(MIN_RANGE_CHUNKS, count) and len(ranges) <= 16


def _ranged(node: str, chunks: int, have: set[int] | None = None, **fields: object) -> Announce:
    bitmap = Bitmap(chunks)
    for index in have or set():
        bitmap.set(index)
    message = _node_announce(node, have=bitmap.to_bytes(), **fields)  # type: ignore[arg-type]
    return Announce(message.digest, node, message.address, message.site, chunks * _SMALL_CHUNK, _SMALL_CHUNK,
                    message.complete, message.have, message.want_lease, message.gone, message.leased)


def test_a_site_fetches_disjoint_ranges_through_several_nodes() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    replies = {f"n{i}": state.announce(_ranged(f"n{i}", 12), 0.0) for i in range(5)}
    assert [replies[f"n{i}"].ranges for i in range(5)] == [((0, 3),), ((4, 7),), ((8, 11),), (), ()]
    assert [n for n, r in replies.items() if r.granted] == ["n0", "n1", "n2"]
    lessees = state.announce(_ranged("n4", 12), 1.0).lessees
    assert [(lease.node, lease.first, lease.last) for lease in lessees] == [("n0", 0, 3), ("n1", 4, 7), ("n2", 8, 11)]
    assert state.announce(_ranged("n4", 12), 1.0).lease_holder == "n0"  # older nodes: the first range's holder
    # n1 finishes its range: released (nothing left to hand out), and nobody gets it again.
    reply = state.announce(_ranged("n1", 12, set(range(4, 8))), 2.0)
    assert not reply.granted and reply.ranges == ()
    assert [lease.node for lease in state.announce(_ranged("n4", 12), 2.5).lessees] == ["n0", "n2"]
    # n0 dies: after TTL its range goes to the next node that asks.
    for t in (3.0, 8.0, 14.0):
        state.announce(_ranged("n2", 12, {8}), t)
    reply = state.announce(_ranged("n3", 12), 0.0 + TTL + 0.1)
    assert reply.granted and reply.ranges == ((0, 3),)
    # Another site has its own ranges.
    other = state.announce(_ranged("m0", 12, site="s2"), 16.0)
    assert other.granted and other.ranges == ((0, 3),)


def test_a_lease_lives_on_bytes_arriving_for_a_bounded_time_without_a_chunk_landing() -> None:
    """On a thin link a chunk may take longer than a lease TTL to reach its holder: the lease
    lapsed mid-chunk and went to the next node that asked, which fetched the range again. Bytes
    arriving (``upstream_bytes`` growing) keep it, for at most ``LEASE_PATIENCE_TTLS`` TTLs since a
    chunk of it last landed (or the grant); without new bytes or chunks it lapses as before (an
    announcement within a TTL of the last progress still extends it by a TTL)."""
    def holder(received: int, have: set[int] | None = None) -> Announce:
        return replace(_ranged("a", 12, have), upstream_bytes=received)

    def taken_by_another(state: CoordinatorState, now: float) -> bool:
        return state.announce(_ranged("c", 12), now).granted

    bound, step = coordinator.LEASE_PATIENCE_TTLS * TTL, TTL / 3 - 1  # not a divisor of the TTL
    # One range. Bytes arriving, no chunk landing: a keeps it up to the bound, then it lapses as
    # if they had stopped, and the next asker gets it.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(holder(0), 0.0).ranges == ((0, 11),)
    now = 0.0
    while now + step < bound:
        now += step
        # Another node asks just before the holder's next announcement (the holder's own would
        # take a lapsed range back, as it did in a site of three nodes).
        state.announce(holder(int(now * 1000)), now)
        assert not taken_by_another(state, now + step - 0.5), now
    renewed = now
    for later in (bound + 0.1, bound + step):  # more bytes, past the bound: no longer progress
        state.announce(holder(int(later * 1000)), later)
    assert not taken_by_another(state, bound + step + 0.1)
    assert taken_by_another(state, renewed + 2 * TTL + 0.1)
    # No new bytes and no chunk: the next asker gets it once a TTL has passed without progress.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    state.announce(holder(500), 0.0)
    for now in (step, 2 * step, TTL - 0.1):
        state.announce(holder(500), now)
    assert taken_by_another(state, 2 * TTL + 0.1)
    # A chunk landing starts the count again.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    state.announce(holder(0), 0.0)
    now = 0.0
    while now + step < bound + 2 * TTL:
        now += step
        state.announce(holder(int(now * 1000), {0} if now >= bound - TTL else None), now)
        assert not taken_by_another(state, now + step - 0.5), now


def test_a_site_whose_upstream_ignores_range_fetches_the_blob_in_one_range() -> None:
    """Such an upstream sends every range holder the blob from its first byte: each holder read
    the blob's start to drop it (about half the number of ranges times the blob). Once a node
    says so (``whole_blob``), the site's split is one range, leased to the holder of the range
    from chunk 0 (it reads on to the blob's end); the other holders' leases end."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    assert [state.announce(_ranged(n, 12), 0.0).ranges for n in "abc"] == [((0, 3),), ((4, 7),), ((8, 11),)]
    reply = state.announce(replace(_ranged("b", 12), whole_blob=True), 0.5)
    assert (reply.granted, reply.ranges) == (False, ())
    assert [(lease.node, lease.first, lease.last) for lease in reply.lessees] == [("a", 0, 11)]
    assert state.announce(_ranged("a", 12, {0, 1}), 1.0).ranges == ((0, 11),)
    assert state.announce(_ranged("c", 12), 1.0).ranges == ()  # its lease ended; no other range
    assert state.announce(_ranged("d", 12), 1.0).ranges == ()
    # The other site keeps its split (its upstream, a mirror of its own, may honour Range).
    assert state.announce(_ranged("m0", 12, site="s2"), 1.0).ranges == ((0, 3),)
    # Chunks landing anywhere in the one range keep it alive; a holder that dies loses it after
    # TTL, and the next asker gets the whole range (it fetches from byte 0 what the site lacks).
    assert state.announce(_ranged("a", 12, set(range(8))), 5.0).ranges == ((0, 11),)
    assert state.announce(_ranged("c", 12, set(range(8))), 5.0 + TTL - 0.1).ranges == ()
    assert state.announce(_ranged("c", 12, set(range(8))), 5.0 + TTL + 0.1).ranges == ((0, 11),)


def test_a_site_told_first_that_its_upstream_ignores_range_is_split_in_one_range() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    assert state.announce(replace(_ranged("a", 12), whole_blob=True), 0.0).ranges == ((0, 11),)
    assert state.announce(_ranged("b", 12), 0.1).ranges == ()


def test_a_node_cutting_the_blob_in_other_chunks_does_not_set_the_sites_split() -> None:
    """Nodes cut a blob by its size (chunk_size_for); one of another version or configuration
    may cut it in other chunks. It announced first and the coordinator split the site's ranges
    by its chunk count: the others' bitmaps did not fit, no range was ever done and leases ran
    out (a test pull took 3.6 copies from the seed). Each chunk size has its own split."""
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    size = 12 * _SMALL_CHUNK
    odd = state.announce(Announce(DIGEST, "old", "127.0.0.9:7000", "s1", size, 4 * _SMALL_CHUNK, False,
                                  Bitmap(3).to_bytes(), True, False), 0.0)
    assert odd.granted and odd.ranges == ((0, 2),)  # 3 chunks of 256 KiB: one range (at least 2 chunks each)
    assert state.announce(_ranged("a", 12), 0.1).ranges == ((0, 3),)
    assert state.announce(_ranged("b", 12), 0.2).ranges == ((4, 7),)
    # a's range is done by its own bitmap, read against its own split; it gets the next one.
    assert state.announce(_ranged("a", 12, set(range(4))), 1.0).ranges == ((8, 11),)


def test_a_site_starts_with_a_mebibyte_of_chunks_in_flight_and_runs_more_as_its_rate_allows() -> None:
    """Each range holder's request gets about 1/R of the site's link when R fetch at once, so a
    chunk (the one every reader needs next too) reaches its holder after R chunks' worth of the
    link's time: 16 holders of 256 KiB chunks at 3 Mbit/s took 11 s a chunk, readers waited
    20-38 s for a byte and 44 chunks were rescued from the seed (N = 32 test bed). A site starts
    with 1 MiB of chunks in flight and runs more leases once its measured upstream rate brings
    them within 2 s (a fast link, or an upstream with a rate per request). The ranges stay small
    (a dead holder loses only its own), and a finished range's holder gets the next free one."""
    assert leases_at_once(64 * 1024, 16) == 16  # the equal-links matrix's small layers: unchanged
    assert leases_at_once(256 * 1024, 16) == 4
    assert leases_at_once(2**20, 16) == 2  # never one: its uplink would carry every first copy
    assert leases_at_once(2**20, 1) == 1 and leases_at_once(64 * 1024, 3) == 3  # max_ranges still bounds
    assert leases_at_once(256 * 1024, 16, upstream_rate=375_000) == 4  # 3 Mbit/s: 2.9 chunks in 2 s
    assert leases_at_once(256 * 1024, 16, upstream_rate=1.5 * 2**20) == 12
    assert leases_at_once(2**20, 16, upstream_rate=100 * 2**20) == 16
    chunk = 256 * 1024

    def asks(node: str, have: set[int] | None = None) -> Announce:
        return replace(_ranged(node, 32, have), size=32 * chunk, chunk_size=chunk)

    state = CoordinatorState(lease_ttl=TTL)
    replies = [state.announce(asks(f"n{i}"), 0.1 * i) for i in range(8)]
    assert [reply.ranges for reply in replies] == [((0, 1),), ((2, 3),), ((4, 5),), ((6, 7),), (), (), (), ()]
    assert not state.announce(asks("n4"), 1.0).granted  # four are live
    # n0 has its range: it is done, and the next free range is n0's at once (its flow goes on).
    assert state.announce(asks("n0", {0, 1}), 1.1).ranges == ((8, 9),)
    assert not state.announce(asks("n4"), 1.2).granted
    # A lease that ends (its holder gone) frees a place: the next asker gets the first free range.
    state.announce(replace(asks("n1"), gone=True, want_lease=False), 1.3)
    assert state.announce(asks("n4"), 1.4).ranges == ((2, 3),)
    assert not state.announce(asks("n5"), 1.5).granted
    # The holders say what they fetched: 4 MiB in 2 s since the first grant, 2 MiB/s, 16 chunks
    # in 2 s — more leases run at once.
    for node in ("n0", "n2", "n3", "n4"):
        state.announce(replace(asks(node), upstream_bytes=4 * chunk), 2.0)
    assert state.announce(asks("n5"), 2.0).ranges == ((10, 11),)
    assert state.announce(asks("n6"), 2.1).ranges == ((12, 13),)


def test_a_node_done_with_its_range_gets_the_next_free_one() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    assert state.announce(_ranged("solo", 12), 0.0).ranges == ((0, 3),)
    # Alone, it fetches range after range.
    assert state.announce(_ranged("solo", 12, set(range(0, 4))), 1.0).ranges == ((4, 7),)
    assert state.announce(_ranged("solo", 12, set(range(0, 8))), 2.0).ranges == ((8, 11),)
    # A range someone already has (a node that fetched it when stuck) is not handed out again.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=3)
    state.announce(_ranged("a", 12), 0.0)
    state.announce(_ranged("stuck", 12, want_lease=False), 0.2)  # known here (else it came from elsewhere)
    state.announce(_ranged("stuck", 12, set(range(4, 8)), want_lease=False), 0.5)
    assert state.announce(_ranged("b", 12), 1.0).ranges == ((8, 11),)


def test_no_lease_when_the_site_already_has_a_complete_copy() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    state.announce(_node_announce("done", complete=True), 0.0)
    reply = state.announce(_node_announce("x"), 1.0)
    assert not reply.granted and reply.lease_holder is None
    assert [p.node for p in reply.holders] == ["done"] and reply.holders[0].complete
    # When the lessee completes, its lease ends and nobody else in the site gets one.
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("a"), 0.0).granted
    reply = state.announce(_node_announce("a", complete=True, want_lease=False), 5.0)
    assert reply.lease_holder is None
    assert not state.announce(_node_announce("b"), 6.0).granted


def test_each_site_gets_its_own_lease() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("a1", site="east"), 0.0).granted
    assert not state.announce(_node_announce("a2", site="east"), 0.0).granted
    assert state.announce(_node_announce("b1", site="west"), 0.0).granted
    assert state.announce(_node_announce("a1", site="east", complete=True), 1.0).lease_holder is None
    # A complete copy in the east does not stop the west (or a third site) from fetching once.
    assert state.announce(_node_announce("c1", site="north"), 2.0).granted
    reply = state.announce(_node_announce("b2", site="west"), 2.0)
    assert not reply.granted and reply.lease_holder == "b1"
    # Holders of the asker's site come first, complete ones first within a site.
    assert [p.site for p in reply.holders][:1] == ["west"]
    east = state.announce(_node_announce("a3", site="east"), 3.0)
    assert [p.node for p in east.holders][:2] == ["a1", "a2"]
    assert state.leases_granted == 3


def test_gone_removes_holder_and_its_lease() -> None:
    state = CoordinatorState(lease_ttl=TTL, max_ranges=1)
    assert state.announce(_node_announce("a"), 0.0).granted
    state.announce(_node_announce("b"), 0.0)
    reply = state.announce(_node_announce("a", gone=True, have=None), 1.0)
    assert not reply.granted
    reply = state.announce(_node_announce("b"), 1.5)
    assert reply.granted and reply.lease_holder == "b"  # no need to wait for the TTL
    assert "a" not in {p.node for p in reply.holders}
    # Gone from a complete holder lets the site fetch again.
    state.announce(_node_announce("b", complete=True), 2.0)
    assert not state.announce(_node_announce("c"), 3.0).granted
    state.announce(_node_announce("b", gone=True, have=None), 4.0)
    assert state.announce(_node_announce("c"), 5.0).granted
    # Gone never grants, even with want_lease.
    assert not CoordinatorState().announce(_node_announce("z", gone=True, have=None), 0.0).granted


def test_holders_expire_unless_refreshed() -> None:
    state = CoordinatorState(lease_ttl=TTL, holder_ttl=60.0, complete_ttl=1800.0)
    state.announce(_node_announce("partial", want_lease=False), 0.0)
    state.announce(_node_announce("complete", complete=True), 0.0)
    state.announce(_node_announce("fresh", want_lease=False), 50.0)
    holders = {p.node for p in state.announce(_node_announce("q", want_lease=False), 59.0).holders}
    assert holders == {"partial", "complete", "fresh"}
    holders = {p.node for p in state.announce(_node_announce("q", want_lease=False), 61.0).holders}
    assert holders == {"complete", "fresh"}
    holders = {p.node for p in state.announce(_node_announce("q", want_lease=False), 1801.0).holders}
    assert holders == set()  # q itself is never listed; fresh expired at 110, complete at 1800
    # A node announcing without a bitmap (not downloading) is not listed as a holder.
    state.announce(_node_announce("idle", have=None), 1802.0)
    assert "idle" not in {p.node for p in state.announce(_node_announce("q"), 1803.0).holders}


def test_coordinator_memory_is_bounded() -> None:
    state = CoordinatorState(max_digests=100, max_holders=50)
    for i in range(1000):
        state.announce(_node_announce("a", digest=_digest(f"d{i}")), float(i))
    assert state.digests() == 100
    # The most recently touched digests are kept.
    reply = state.announce(_node_announce("b", digest=_digest("d999")), 1000.0)
    assert [p.node for p in reply.holders] == ["a"]
    reply = state.announce(_node_announce("b", digest=_digest("d0")), 1000.0)
    assert reply.holders == ()
    for i in range(500):
        state.announce(_node_announce(f"h{i}"), 1001.0)
    reply = state.announce(_node_announce("last"), 1001.0)
    assert len(reply.holders) <= 50
    assert "h499" in {p.node for p in reply.holders} and "h0" not in {p.node for p in reply.holders}
    # A reply never lists more than a message may carry.
    big = CoordinatorState()
    for i in range(MAX_HOLDERS * 2):
        big.announce(_node_announce(f"h{i}"), 0.0)
    reply = big.announce(_node_announce("asker"), 0.0)
    assert len(reply.holders) == MAX_HOLDERS
    assert decode(encode(reply)) == reply
