"""The scanner wired into the seed: scans after a push, the scan API, OCI 1.1 referrers, the
audit trail, the ``[[scanning]]`` pull policy (through the seed, through p2pd and through a
real containerd behind p2pd), and re-matching when ``seed vulndb import`` runs beside it.

Images are real gzip tar layers (an Alpine package database, an npm package) pushed over
HTTP; advisories are OSV records in the real schema (tests/fixtures/scan/builders.py).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.httpd import ServerInfo
from p2pd.oci import mediatypes
from p2pd.oci.digest import digest_of
from seed.audit import AuditEvent, audit_directory, iter_directory_records
from seed.cli import main as seed_main
from seed.config import ConfigError, load_config
from seed.registry import SeedRegistry, serve_seed
from seed.scan import ScanReport
from seed.scan.referrers import KIND_ANNOTATION, REPORT_ARTIFACT_TYPE
from seed.scan.sbom import SBOM_MEDIA_TYPE
from seed.scan.vulndb import import_database
from tests.fixtures.scan.builders import ALPINE_OS_RELEASE, APK_INSTALLED, file, gzip_layer, osv, write_osv_dir
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import host_arch
from tests.p2pd_support import NS, agent_config, agent_metric, pull, start_agent, write_hosts
from tests.test_seed_api import push_blob

CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
MEDIUM = "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:L/A:N"  # 4.2
LODASH_CRITICAL = "GHSA-p6mc-m468-83gw"
LODASH_CVE = "CVE-2020-8203"
MUSL_MEDIUM = "ALPINE-CVE-2025-26519"
WAIT = 20  # seconds any one wait in these tests may take

ADVISORIES = [
    osv(LODASH_CRITICAL, "npm", "lodash", fixed="4.17.21", aliases=[LODASH_CVE], cvss=CRITICAL,
        summary="Prototype pollution in lodash"),
    osv(MUSL_MEDIUM, "Alpine:v3.19", "musl", fixed="1.2.4_git20230717-r5", aliases=["CVE-2025-26519"], cvss=MEDIUM),
]

# Scans at normal priority and unpaced: the default ("idle", half a core) would let other
# work on a busy test machine starve them.
POLICY = f"""
[scan]
cpu_share = 1.0
priority = "normal"
database_poll_interval = 0.2

[[scanning]]
repositories = ["prod/**"]
block_severity = "critical"
unscanned = "deny"

[[scanning]]
repositories = ["accepted/**"]
block_severity = "critical"
allow = [{{ id = "{LODASH_CVE}", expires = 2999-12-31, reason = "not reachable" }}]

[[scanning]]
repositories = ["expired/**"]
block_severity = "critical"
allow = [{{ id = "{LODASH_CRITICAL}", expires = 2001-01-01 }}]
"""
NO_SCAN_ON_PUSH = POLICY.replace("cpu_share = 1.0", "cpu_share = 1.0\nscan_on_push = false")


# ---- images -------------------------------------------------------------------------------


def base_layer() -> bytes:
    return gzip_layer([file("etc/os-release", ALPINE_OS_RELEASE), file("lib/apk/db/installed", APK_INSTALLED)])


def app_layer(lodash_version: str) -> bytes:
    package = json.dumps({"name": "lodash", "version": lodash_version, "license": "MIT"})
    return gzip_layer([file("srv/app/node_modules/lodash/package.json", package),
                       file("srv/app/index.js", f"// lodash {lodash_version}\n")])


async def push_image(client: httpx.AsyncClient, repository: str, tag: str, layers: list[bytes]) -> str:
    """Pushes an OCI image whose config lists the layers' real diff_ids (containerd checks them);
    returns the manifest digest."""
    # A truncated layer has no diff_id: whatever it unpacks to is what the config claims.
    diff_ids = [str(digest_of(zlib.decompressobj(wbits=31).decompress(layer))) for layer in layers]
    config = json.dumps({"architecture": host_arch(), "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    for blob in (config, *layers):
        await push_blob(client, repository, blob)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(digest_of(config)),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(digest_of(layer)),
                    "size": len(layer)} for layer in layers],
    }).encode()
    r = await client.put(f"/v2/{repository}/manifests/{tag}", content=manifest,
                         headers={"Content-Type": mediatypes.OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return str(digest_of(manifest))


async def push_vulnerable(client: httpx.AsyncClient, repository: str, tag: str = "v1") -> str:
    return await push_image(client, repository, tag, [base_layer(), app_layer("4.17.20")])


async def push_fixed(client: httpx.AsyncClient, repository: str, tag: str = "v1") -> str:
    return await push_image(client, repository, tag, [base_layer(), app_layer("4.17.21")])


# ---- the seed -------------------------------------------------------------------------------


@dataclass
class Completed:
    """An ``on_scan_completed`` subscriber: the reports it was told of, and a way to wait."""

    reports: list[ScanReport] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def __call__(self, report: ScanReport) -> None:
        self.reports.append(report)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, digest: str) -> list[ScanReport]:
        return [report for report in self.reports if report.digest == digest]

    async def wait_for(self, digest: str, count: int = 1) -> ScanReport:
        with trio.fail_after(WAIT):
            while True:
                changed = self._changed
                if len(self.of(digest)) >= count:
                    return self.of(digest)[-1]
                await changed.wait()


@dataclass
class ScanSeed:
    info: ServerInfo
    registry: SeedRegistry
    client: httpx.AsyncClient
    data: Path
    completed: Completed

    def audit(self, action: str) -> list[AuditEvent]:
        return [r.event for r in iter_directory_records(audit_directory(self.data)) if r.action == action]

    async def wait_audit(self, action: str, predicate: Callable[[AuditEvent], bool]) -> AuditEvent:
        """The audit writer fsyncs in a worker thread: wait (bounded) for the record to land."""
        with trio.fail_after(WAIT):
            while True:
                found = [record for record in self.audit(action) if predicate(record)]
                if found:
                    return found[-1]
                await trio.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.metrics.registry.get_sample_value(name, labels) or 0.0


async def start_scan_seed(nursery: trio.Nursery, tmp_path: Path, toml: str = POLICY, *,
                          advisories: list[dict[str, object]] | None = None) -> ScanSeed:
    data = tmp_path / "data"
    import_database(data, write_osv_dir(tmp_path / "osv", ADVISORIES if advisories is None else advisories))
    config_file = tmp_path / "seed.toml"
    config_file.write_text(toml)
    config = load_config(config_file, listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    completed = Completed()
    registry.on_scan_completed.append(completed)
    client = httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30)
    nursery.start_soon(_close_at_end, client)
    return ScanSeed(info, registry, client, data, completed)


async def _close_at_end(client: httpx.AsyncClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


@pytest.fixture
async def seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ScanSeed]:
    yield await start_scan_seed(nursery, tmp_path)


def error(response: httpx.Response) -> dict[str, object]:
    entry = response.json()["errors"][0]
    assert isinstance(entry, dict)
    return entry


# ---- scans after a push: report, referrers, audit, subscribers --------------------------------


async def test_a_push_is_scanned_and_its_results_attached(seed: ScanSeed) -> None:
    digest = await push_vulnerable(seed.client, "team/app")
    report = await seed.completed.wait_for(digest)
    assert report.status == "complete" and report.repository == "team/app"

    r = await seed.client.get("/v2/team/app/scan/v1")  # by tag, or by digest: the same report
    assert r.status_code == 200 and r.headers["docker-content-digest"] == digest
    assert r.headers["p2pd-scan-state"] == "scanned"
    assert r.json() == (await seed.client.get(f"/v2/team/app/scan/{digest}")).json()
    document = r.json()
    assert document["digest"] == digest and document["status"] == "complete"
    by_id = {finding["id"]: finding for finding in document["findings"]}
    assert set(by_id) == {LODASH_CRITICAL, MUSL_MEDIUM}
    lodash = by_id[LODASH_CRITICAL]
    assert lodash["aliases"] == [LODASH_CVE] and lodash["package"] == "lodash"
    assert (lodash["installed_version"], lodash["fixed_version"], lodash["severity"]) == ("4.17.20", "4.17.21",
                                                                                        "critical")
    assert lodash["layer"] == str(digest_of(app_layer("4.17.20")))
    assert by_id[MUSL_MEDIUM]["severity"] == "medium" and by_id[MUSL_MEDIUM]["layer"] == str(digest_of(base_layer()))
    assert document["summary"]["critical"] == 1
    assert (await seed.client.head("/v2/team/app/scan/v1")).status_code == 200

    # The SBOM and the report are OCI 1.1 referrers of the image, as any referrers client reads them.
    r = await seed.client.get(f"/v2/team/app/referrers/{digest}")
    referrers = {entry["artifactType"]: entry for entry in r.json()["manifests"]}
    assert set(referrers) == {SBOM_MEDIA_TYPE, REPORT_ARTIFACT_TYPE}
    assert referrers[SBOM_MEDIA_TYPE]["annotations"][KIND_ANNOTATION] == "sbom"
    sbom_manifest = (await seed.client.get(f"/v2/team/app/manifests/{referrers[SBOM_MEDIA_TYPE]['digest']}")).json()
    assert sbom_manifest["subject"]["digest"] == digest
    sbom = (await seed.client.get(f"/v2/team/app/blobs/{sbom_manifest['layers'][0]['digest']}")).json()
    assert sbom["bomFormat"] == "CycloneDX"
    assert {(c["name"], c["version"]) for c in sbom["components"]} >= {("lodash", "4.17.20"), ("musl",
                                                                       "1.2.4_git20230717-r4")}
    # The scanner's own referrers are artifacts: never scanned themselves.
    assert seed.metric("seed_scans_total", result="complete") == 1
    for entry in referrers.values():
        assert seed.registry.scanner is not None and seed.registry.scanner.state(entry["digest"]) == "unscanned"

    record = await seed.wait_audit("scan.completed", lambda record: record.digest == digest)
    assert record.repository == "team/app" and record.actor_kind == "system"
    assert record.detail["status"] == "complete" and record.detail["summary"] == {"critical": 1, "medium": 1}
    assert record.detail["advisories"] == sorted([LODASH_CRITICAL, MUSL_MEDIUM])
    metrics = (await seed.client.get("/metrics")).text
    assert "seed_scan_queue_depth 0.0" in metrics and 'seed_scan_findings_total{severity="critical"} 1.0' in metrics

    # The same content under another tag is not scanned again.
    r = await seed.client.put("/v2/team/app/manifests/latest", headers={"Content-Type": mediatypes.OCI_MANIFEST},
                              content=(await seed.client.get(f"/v2/team/app/manifests/{digest}")).content)
    assert r.status_code == 201
    await trio.sleep(0.2)
    assert seed.metric("seed_scans_total", result="complete") == 1 and len(seed.completed.of(digest)) == 1


async def test_the_scan_api_states_and_rescans(nursery: trio.Nursery, tmp_path: Path) -> None:
    seed = await start_scan_seed(nursery, tmp_path, NO_SCAN_ON_PUSH)
    digest = await push_fixed(seed.client, "team/app")
    r = await seed.client.get("/v2/team/app/scan/v1")
    assert r.status_code == 404 and error(r)["code"] == "NOT_FOUND"
    assert error(r)["detail"] == {"digest": digest, "state": "unscanned"}
    # A rescan request answers at once; the report follows.
    r = await seed.client.post("/v2/team/app/scan/v1")
    assert r.status_code == 202 and r.json() == {"repository": "team/app", "digest": digest, "state": "pending"}
    assert r.headers["location"] == f"/v2/team/app/scan/{digest}"
    r = await seed.client.get(f"/v2/team/app/scan/{digest}")
    assert r.status_code in (200, 202)
    if r.status_code == 202:
        assert r.json()["state"] in ("pending", "scanning")
    first = await seed.completed.wait_for(digest)
    assert first.findings[0][1].id == MUSL_MEDIUM and len(first.findings) == 1
    # Asked again: scanned again, the report replaced (and its referrers with it).
    r = await seed.client.post(f"/v2/team/app/scan/{digest}")
    assert r.status_code == 202
    second = await seed.completed.wait_for(digest, count=2)
    assert second.scanned_at >= first.scanned_at
    referrers = (await seed.client.get(f"/v2/team/app/referrers/{digest}")).json()["manifests"]
    assert sorted(entry["artifactType"] for entry in referrers) == sorted([SBOM_MEDIA_TYPE, REPORT_ARTIFACT_TYPE])

    # Unknown manifests, other repositories, artifacts, bad references.
    for path in ("/v2/team/app/scan/nope", f"/v2/team/other/scan/{digest}",
                 f"/v2/team/app/scan/{digest_of(b'never pushed')}"):
        for method in ("GET", "POST"):
            r = await seed.client.request(method, path)
            assert r.status_code == 404 and error(r)["code"] == "MANIFEST_UNKNOWN", (method, path, r.text)
    artifact = referrers[0]["digest"]
    r = await seed.client.post(f"/v2/team/app/scan/{artifact}")
    assert r.status_code == 400 and error(r)["code"] == "UNSUPPORTED"
    r = await seed.client.get("/v2/team/app/scan/bad%20tag")
    assert r.status_code == 400
    r = await seed.client.delete(f"/v2/team/app/scan/{digest}")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


async def test_scanning_disabled(nursery: trio.Nursery, tmp_path: Path) -> None:
    seed = await start_scan_seed(nursery, tmp_path, "[scan]\nenabled = false\n")
    digest = await push_vulnerable(seed.client, "team/app")
    assert seed.registry.scanner is None
    for method in ("GET", "POST"):
        r = await seed.client.request(method, f"/v2/team/app/scan/{digest}")
        assert r.status_code == 404 and "disabled" in str(error(r)["message"])
    assert not (seed.data / "scan" / "results").exists()


# ---- the pull policy, through the seed -----------------------------------------------------


async def test_policy_blocks_pulls_by_tag_only(seed: ScanSeed) -> None:
    vulnerable = await push_vulnerable(seed.client, "prod/app")
    fixed = await push_fixed(seed.client, "prod/fixed")
    await seed.completed.wait_for(vulnerable)
    await seed.completed.wait_for(fixed)

    for method in ("GET", "HEAD"):
        r = await seed.client.request(method, "/v2/prod/app/manifests/v1")
        assert r.status_code == 403, (method, r.status_code)
    r = await seed.client.get("/v2/prod/app/manifests/v1")
    assert error(r)["code"] == "DENIED"
    assert LODASH_CRITICAL in str(error(r)["message"]) and "critical" in str(error(r)["message"])
    assert error(r)["detail"] == {"policy": "scanning", "digest": vulnerable, "advisories": [LODASH_CRITICAL]}
    # The medium finding of the fixed image does not block; pulls by digest and blob pulls never do.
    assert (await seed.client.get("/v2/prod/fixed/manifests/v1")).status_code == 200
    manifest = await seed.client.get(f"/v2/prod/app/manifests/{vulnerable}")
    assert manifest.status_code == 200
    for layer in manifest.json()["layers"]:
        assert (await seed.client.get(f"/v2/prod/app/blobs/{layer['digest']}")).status_code == 200
    # Repositories no rule covers are not policed.
    other = await push_vulnerable(seed.client, "team/app")
    await seed.completed.wait_for(other)
    assert (await seed.client.get("/v2/team/app/manifests/v1")).status_code == 200

    record = await seed.wait_audit("policy.denied", lambda record: record.repository == "prod/app")
    assert (record.reference, record.digest, record.status) == ("v1", vulnerable, 403)
    assert record.detail["policy"] == "scanning" and record.detail["advisories"] == [LODASH_CRITICAL]
    assert record.detail["rule"] == ["prod/**"]
    # A client retrying does not flood the audit log.
    for _ in range(5):
        assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 403
    await trio.sleep(0.2)
    assert len([r for r in seed.audit("policy.denied") if r.repository == "prod/app"]) == 1


async def test_accepted_risks_and_their_expiry(seed: ScanSeed) -> None:
    accepted = await push_vulnerable(seed.client, "accepted/app")
    expired = await push_vulnerable(seed.client, "expired/app")
    await seed.completed.wait_for(accepted)
    # Same content, one scan; the policy differs by repository.
    assert accepted == expired
    # Accepted by its alias (CVE id) until 2999.
    assert (await seed.client.get("/v2/accepted/app/manifests/v1")).status_code == 200
    r = await seed.client.get("/v2/expired/app/manifests/v1")
    assert r.status_code == 403 and error(r)["detail"]["advisories"] == [LODASH_CRITICAL]  # type: ignore[index]


async def test_unscanned_images_while_pending(nursery: trio.Nursery, tmp_path: Path) -> None:
    seed = await start_scan_seed(nursery, tmp_path, NO_SCAN_ON_PUSH)
    digest = await push_fixed(seed.client, "prod/new")
    await push_fixed(seed.client, "accepted/new")
    # prod/** denies unscanned images; the refused pull queues the scan the push did not.
    r = await seed.client.get("/v2/prod/new/manifests/v1")
    assert r.status_code == 403 and "not been scanned" in str(error(r)["message"])
    # accepted/** allows them (the default).
    assert (await seed.client.get("/v2/accepted/new/manifests/v1")).status_code == 200
    await seed.completed.wait_for(digest)
    assert (await seed.client.get("/v2/prod/new/manifests/v1")).status_code == 200


async def test_an_incomplete_scan_blocks_and_attaches_nothing(seed: ScanSeed) -> None:
    truncated = app_layer("4.17.21")[:-40]
    digest = await push_image(seed.client, "prod/broken", "v1", [base_layer(), truncated])
    report = await seed.completed.wait_for(digest)
    assert report.status == "incomplete"
    r = await seed.client.get("/v2/prod/broken/manifests/v1")
    assert r.status_code == 403 and "incomplete" in str(error(r)["message"])
    assert (await seed.client.get(f"/v2/prod/broken/referrers/{digest}")).json()["manifests"] == []
    document = (await seed.client.get("/v2/prod/broken/scan/v1")).json()
    assert document["status"] == "incomplete" and document["problems"]
    # The seed keeps serving.
    assert (await seed.client.get("/healthz")).status_code == 200


async def test_a_reload_applies_new_rules(nursery: trio.Nursery, tmp_path: Path) -> None:
    seed = await start_scan_seed(nursery, tmp_path, '[scan]\ncpu_share = 1.0\npriority = "normal"\n')
    digest = await push_vulnerable(seed.client, "prod/app")
    await seed.completed.wait_for(digest)
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 200
    (tmp_path / "seed.toml").write_text(POLICY)
    await seed.registry.reload(load_config(tmp_path / "seed.toml", listen="127.0.0.1:0", data=seed.data))
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 403


def test_scan_sections_are_read_and_checked(tmp_path: Path) -> None:
    config_file = tmp_path / "seed.toml"
    config_file.write_text(POLICY)
    config = load_config(config_file)
    assert config.scanning.scan.cpu_share == 1.0
    assert [rule.repositories for rule in config.scanning.rules] == [("prod/**",), ("accepted/**",), ("expired/**",)]
    for bad in ("[scan]\nworkers = 0\n", "[scan]\nspeed = 2\n", '[[scanning]]\nrepositories = ["a/**"]\n'
                'block_severity = "bad"\n', "[scanning]\nrepositories = 1\n"):
        config_file.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(config_file)


# ---- a new database, imported beside the running seed ----------------------------------------


async def test_an_import_beside_the_running_seed_rematches_and_announces(seed: ScanSeed, tmp_path: Path) -> None:
    later = await push_fixed(seed.client, "prod/later")
    other = await push_image(seed.client, "team/other", "v1", [base_layer(), gzip_layer([file(
        "srv/node_modules/left-pad/package.json", '{"name": "left-pad", "version": "1.3.0"}')])])
    await seed.completed.wait_for(later)
    await seed.completed.wait_for(other)
    assert (await seed.client.get("/v2/prod/later/manifests/v1")).status_code == 200

    # `seed vulndb import` as an operator runs it, in another thread (the seed notices within
    # database_poll_interval): a new critical advisory for the lodash the image has.
    new_advisory = osv("GHSA-new0-lodash-0001", "npm", "lodash", fixed="4.17.22", cvss=CRITICAL)
    source = write_osv_dir(tmp_path / "osv-v2", [*ADVISORIES, new_advisory])
    status = await trio.to_thread.run_sync(seed_main, ["vulndb", "import", "--data", str(seed.data), str(source)])
    assert status == 0
    report = await seed.completed.wait_for(later, count=2)
    assert [finding.id for _platform, finding in report.findings if finding.severity == "critical"] == [
        "GHSA-new0-lodash-0001"]
    r = await seed.client.get("/v2/prod/later/manifests/v1")
    assert r.status_code == 403 and "GHSA-new0-lodash-0001" in str(error(r)["message"])
    record = await seed.wait_audit("scan.completed", lambda record: record.digest == later
                                   and "GHSA-new0-lodash-0001" in record.detail["advisories"])
    assert record.detail["summary"]["critical"] == 1
    # The image whose packages the import did not touch is neither re-matched nor announced.
    assert len(seed.completed.of(other)) == 1
    assert seed.metric("seed_scan_rematched_total") == 1
    # The referrers now carry the new result.
    referrers = (await seed.client.get(f"/v2/prod/later/referrers/{later}",
                                       params={"artifactType": REPORT_ARTIFACT_TYPE})).json()["manifests"]
    assert len(referrers) == 1
    attached = await seed.client.get(f"/v2/prod/later/manifests/{referrers[0]['digest']}")
    report_blob = (await seed.client.get(f"/v2/prod/later/blobs/{attached.json()['layers'][0]['digest']}")).json()
    assert "GHSA-new0-lodash-0001" in {finding["id"] for finding in report_blob["findings"]}


# ---- the pull policy, through p2pd ---------------------------------------------------------


async def test_through_p2pd_a_refused_tag_is_never_answered_from_cache(seed: ScanSeed, tmp_path: Path,
                                                                        nursery: trio.Nursery) -> None:
    later = await push_fixed(seed.client, "prod/later")
    blocked = await push_vulnerable(seed.client, "prod/app")
    await seed.completed.wait_for(later)
    await seed.completed.wait_for(blocked)
    # tag_ttl = 0: the agent asks the seed at every pull by tag (as it does once the TTL ran out).
    agent = await start_agent(nursery, agent_config(tmp_path, seed.info.url, cache={"tag_ttl": 0}))
    async with httpx.AsyncClient(base_url=agent.info.url, trust_env=False, timeout=30) as client:
        r = await client.get("/v2/prod/later/manifests/v1", params={"ns": NS})
        assert r.status_code == 200 and r.headers["docker-content-digest"] == later
        # Refused by the seed: the agent answers 404, so containerd falls back to the seed itself,
        # which answers the 403 with the advisories (the containerd test below shows the whole path).
        for method in ("GET", "HEAD"):
            r = await client.request(method, "/v2/prod/app/manifests/v1", params={"ns": NS})
            assert r.status_code == 404, (method, r.status_code)
        assert error(r if r.content else await client.get("/v2/prod/app/manifests/v1", params={"ns": NS}))[
            "code"] == "MANIFEST_UNKNOWN"

        # A tag the agent knows becomes blocked (new database): the seed's 403 must not become
        # the last known digest (stale-if-error is for an upstream that is down, not one that says no).
        new_advisory = osv("GHSA-new0-lodash-0001", "npm", "lodash", fixed="4.17.22", cvss=CRITICAL)
        import_database(seed.data, write_osv_dir(tmp_path / "osv-v2", [*ADVISORIES, new_advisory]))
        await seed.completed.wait_for(later, count=2)
        assert (await seed.client.get("/v2/prod/later/manifests/v1")).status_code == 403
        r = await client.get("/v2/prod/later/manifests/v1", params={"ns": NS})
        assert r.status_code == 404
        assert agent_metric(agent, "p2pd_stale_tag_answers_total") == 0
        assert agent.store.load_tag(NS, "prod/later", "v1") is None
        # Pulls by digest are not policed (by the seed, so not through the agent either).
        r = await client.get(f"/v2/prod/later/manifests/{later}", params={"ns": NS})
        assert r.status_code == 200


@pytest.mark.root
async def test_containerd_through_p2pd_is_refused_with_the_seeds_reason(seed: ScanSeed, tmp_path: Path,
                                                                          nursery: trio.Nursery,
                                                                          containerd: PrivateContainerd) -> None:
    blocked = await push_vulnerable(seed.client, "prod/app")
    allowed = await push_fixed(seed.client, "prod/fixed")
    await seed.completed.wait_for(blocked)
    await seed.completed.wait_for(allowed)
    agent = await start_agent(nursery, agent_config(tmp_path, seed.info.url, cache={"tag_ttl": 0}))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, seed.info.url)

    await pull(containerd, f"{NS}/prod/fixed:v1", hosts)
    assert containerd.image_digest(f"{NS}/prod/fixed:v1") == allowed
    result = await pull(containerd, f"{NS}/prod/app:v1", hosts, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    # What containerd logs: the agent's 404 (next host), then the seed's refusal.
    assert "trying next host - response was http.StatusNotFound" in output, output
    assert f"pulling from host {seed.info.host}:{seed.info.port} failed" in output and "403 Forbidden" in output, output
    assert f"{NS}/prod/app:v1" not in containerd.images()
    # containerd asked the agent first (404), then the seed (403): the agent never stored the tag.
    assert agent.store.load_tag(NS, "prod/app", "v1") is None


async def test_seed_scan_cli_asks_a_running_seed_by_url(seed: ScanSeed, capsys: pytest.CaptureFixture[str]) -> None:
    from seed.cli import main as seed_main

    digest = await push_vulnerable(seed.client, "team/app")
    # The command waits (bounded) while the scan is pending, then prints the report.
    status = await trio.to_thread.run_sync(seed_main, ["scan", "team/app:v1", "--url", seed.info.url, "--format",
                                                       "json", "--fail-on", "critical", "--wait", "60"])
    assert status == 3  # a critical finding
    document = json.loads(capsys.readouterr().out)
    assert document["digest"] == digest and LODASH_CRITICAL in {f["id"] for f in document["findings"]}
    assert await trio.to_thread.run_sync(seed_main, ["scan", "team/absent:v1", "--url", seed.info.url]) == 1
