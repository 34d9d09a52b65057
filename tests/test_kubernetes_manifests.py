"""docs/kubernetes/: every manifest loads into the official Kubernetes client's models, the pieces
refer to each other correctly, and the DaemonSet's own command lines work on a node.

The node test takes the init container's and the agent container's command lines from
daemonset.yaml and p2pd.toml from configmap.yaml, replaces only what a node provides (the mounted
paths, the node's address, the ports, the registry's address) with temporary ones, and runs them:
``p2pd containerd-config`` writes hosts.toml for a private containerd, ``p2pd serve`` starts the
agent, ``ctr images pull`` goes through it, and with the agent stopped (a rolling update) the pull
falls back to the registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes.client import ApiClient

from p2pd.config import load_config
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import OciLayout
from tests.harness.net import free_port
from tests.harness.p2pd_process import parse_metrics
from tests.harness.process import ManagedProcess
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.tools import clean_env
from tests.p2pd_support import CTR_TIMEOUT, blob_sizes

MANIFESTS = Path(__file__).parents[1] / "docs" / "kubernetes"

# (apiVersion, kind) -> the client's model; a kind missing here fails the test until it is added.
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}
KUSTOMIZATION = "kustomization.yaml"
CLUSTER_DOMAIN = "cluster.local"
# The registry the manifests are written for, as image references and hosts.toml name it.
REGISTRY_URL = "http://seed.example:5000"


# ---------------------------------------------------------------- reading the manifests


def _load_all(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def _kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob(KUSTOMIZATION))


def _patch_paths(kustomization: Path) -> list[Path]:
    return [kustomization.parent / patch["path"] for patch in _load_all(kustomization)[0].get("patches", [])]


def _resource_files() -> list[Path]:
    """Every YAML file that is neither a kustomization nor a patch: the manifests themselves."""
    special = {path for k in _kustomizations() for path in [k, *_patch_paths(k)]}
    return sorted(path for path in MANIFESTS.rglob("*.yaml") if path not in special)


def validated(document: Mapping[str, Any]) -> Any:
    """The document as the client's model; fails on a missing required field, a wrong type, and on
    any field the model does not know (a misspelled key would be dropped silently by the API)."""
    model = MODELS[(document["apiVersion"], document["kind"])]
    client = ApiClient()
    obj = client.deserialize(json.dumps(document), model, "application/json")
    assert client.sanitize_for_serialization(obj) == document, f"{document['kind']}: unknown or misspelled field"
    return obj


def _document(kind: str) -> dict[str, Any]:
    (found,) = [d for path in _resource_files() for d in _load_all(path) if d["kind"] == kind]
    return found


def _json_pointer(document: Any, pointer: str) -> tuple[Any, str | int]:
    """The parent container and key that an RFC 6901 pointer names."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def apply_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``replace`` operations (all the overlays use): the target must exist, as kustomize requires."""
    patched = json.loads(json.dumps(document))
    for operation in operations:
        assert operation["op"] == "replace", f"unsupported patch operation {operation}"
        parent, key = _json_pointer(patched, operation["path"])
        assert key in range(len(parent)) if isinstance(parent, list) else key in parent, operation["path"]
        parent[key] = operation["value"]
    return patched


def flags(args: list[str]) -> dict[str, list[str]]:
    """``--name=value`` arguments (the manifests' only form) by name; repeated flags keep every value."""
    found: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            found.setdefault(name, []).append(value)
    return found


def _flag(args: list[str], name: str) -> str:
    (value,) = flags(args)[name]
    return value


def _pod(daemonset: Mapping[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return pod


# ---------------------------------------------------------------- the manifests as documents


def test_every_manifest_loads_into_the_client_models() -> None:
    files = _resource_files()
    assert {path.name for path in files} >= {"namespace.yaml", "configmap.yaml", "service.yaml", "daemonset.yaml"}
    kinds = [validated(document).kind for path in files for document in _load_all(path)]
    assert sorted(kinds) == ["ConfigMap", "DaemonSet", "Namespace", "Service"]


def test_validation_catches_misspelled_and_missing_fields() -> None:
    misspelled = _document("DaemonSet")
    _pod(misspelled)["hostNetwrok"] = True
    with pytest.raises(AssertionError, match="unknown or misspelled field"):
        validated(misspelled)
    nameless = _document("DaemonSet")
    del _pod(nameless)["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):  # pydantic's ValidationError is a ValueError
        validated(nameless)


def test_kustomizations_list_every_manifest_and_name_the_secret_the_pods_mount() -> None:
    listed: set[Path] = set()
    for kustomization in _kustomizations():
        document = _load_all(kustomization)[0]
        assert document["kind"] == "Kustomization"
        for resource in document.get("resources", []):
            path = (kustomization.parent / resource).resolve()
            assert path.is_file() or (path / KUSTOMIZATION).is_file(), f"{kustomization}: {resource}"
            listed.add(path)
        for patch in _patch_paths(kustomization):
            assert patch.is_file(), patch
    assert {path.resolve() for path in _resource_files()} <= listed

    base = _load_all(MANIFESTS / KUSTOMIZATION)[0]
    (generator,) = base["secretGenerator"]
    volumes = {volume["name"]: volume for volume in _pod(_document("DaemonSet"))["volumes"]}
    assert volumes["cluster-key"]["secret"]["secretName"] == generator["name"]
    assert generator["options"]["disableNameSuffixHash"] is True  # the DaemonSet names it without a hash
    # The key file the generator reads is the operator's own and never committed.
    assert generator["files"] == ["cluster.key"]
    assert "cluster.key" in (MANIFESTS / ".gitignore").read_text().split()
    images = {image["name"] for image in base["images"]}
    assert {c["image"].rpartition(":")[0] for c in _containers(_document("DaemonSet"))} == images


def _containers(daemonset: Mapping[str, Any]) -> list[dict[str, Any]]:
    pod = _pod(daemonset)
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_daemonset_wiring() -> None:
    daemonset, service, config_map = _document("DaemonSet"), _document("Service"), _document("ConfigMap")
    pod = _pod(daemonset)
    (init,), (agent,) = pod["initContainers"], pod["containers"]
    serve = agent["args"][agent["args"].index("serve"):]
    listen = _flag(serve, "--listen")

    # On the node's network, containerd-facing endpoint on loopback: the init container's --endpoint.
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert listen.startswith("127.0.0.1:")
    assert _flag(init["args"], "--endpoint") == f"http://{listen}"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", int(listen.rpartition(":")[2]), path)

    # One node at a time, never a second pod on a node (the ports are the node's).
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert daemonset["spec"]["minReadySeconds"] > 0

    # The headless Service finds exactly these pods on the peer port they listen on.
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container_port,) = agent["ports"]
    assert port["targetPort"] == container_port["name"]
    peer_port = container_port["containerPort"]
    assert port["port"] == peer_port
    assert _flag(serve, "--peer-listen") == _flag(serve, "--advertise") == f"$(NODE_IP):{peer_port}"
    service_name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.{CLUSTER_DOMAIN}"
    assert _flag(serve, "--peer-dns") == f"{service_name}:{peer_port}"

    # Every container has requests and limits; nothing may gain privileges.
    for container in _containers(daemonset):
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    # Mounts: the init container writes into the node's containerd hosts directory, the agent reads
    # its configuration and key and keeps its cache on the node.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount for container in _containers(daemonset) for mount in container["volumeMounts"]}
    assert mounts.keys() == volumes.keys()
    assert volumes["containerd-hosts"]["hostPath"]["path"] == "/etc/containerd/certs.d"
    assert _flag(init["args"], "--hosts-dir") == mounts["containerd-hosts"]["mountPath"]
    assert volumes["cache"]["hostPath"]["path"] == _flag(serve, "--data") == mounts["cache"]["mountPath"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert _flag(serve, "--config") == mounts["config"]["mountPath"]
    assert mounts["config"]["subPath"] in config_map["data"]
    assert Path(_flag(serve, "--cluster-key-file")).parent == Path(mounts["cluster-key"]["mountPath"])


def test_p2pd_toml_loads_and_matches_the_init_container(tmp_path: Path) -> None:
    config_file = tmp_path / "p2pd.toml"
    config_file.write_text(_document("ConfigMap")["data"]["p2pd.toml"])
    config = load_config(config_file)
    assert config.swarm.mdns is False  # peers come from the headless Service
    (init,) = _pod(_document("DaemonSet"))["initContainers"]
    # The registry hosts.toml sends to p2pd is an upstream p2pd knows, at the same URL.
    registries = dict(value.partition("=")[::2] for value in flags(init["args"])["--registry"])
    upstreams = {upstream.namespace: upstream.url for upstream in config.upstreams}
    for namespace, url in upstreams.items():
        assert registries[namespace] == url
    assert set(registries) - set(upstreams) <= set(config.allow_registries)


def test_crio_overlay_runs_registries_config_on_the_containers_directory() -> None:
    overlay = MANIFESTS / "crio" / KUSTOMIZATION
    (patch,) = _patch_paths(overlay)
    (target,) = [p["target"] for p in _load_all(overlay)[0]["patches"]]
    daemonset = _document("DaemonSet")
    assert (target["kind"], target["name"]) == (daemonset["kind"], daemonset["metadata"]["name"])
    patched = apply_patch(daemonset, _load_all(patch)[0])
    validated(patched)
    pod = _pod(patched)
    (init,) = pod["initContainers"]
    assert init["args"][0] == "registries-config"
    (mount,) = init["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/etc/containers/registries.conf.d"
    assert _flag(init["args"], "--dir") == mount["mountPath"]
    # Same agent, same endpoint: only the init container differs.
    assert pod["containers"] == _pod(daemonset)["containers"]
    assert _flag(init["args"], "--endpoint") == _flag(_pod(daemonset)["initContainers"][0]["args"], "--endpoint")


# ---------------------------------------------------------------- the command lines on a node


def _expand(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


class NodeSimulation:
    """What a node gives the pod, in temporary places: the volumes, the node's address, free ports.

    ``command(container)`` is the container's command line with each mount path replaced by its
    temporary directory, ``$(VAR)`` expanded from the container's env and the fixed ports and the
    registry's address replaced; p2pd runs as ``python -m p2pd`` (the image's ``p2pd``).
    """

    def __init__(self, root: Path, daemonset: Mapping[str, Any], config_map: Mapping[str, Any],
                 registry_url: str, cluster_key: Callable[[Path], None]) -> None:
        self.pod = _pod(daemonset)
        self.listen_port, self.peer_port = free_port(), free_port()
        self.registry_url = registry_url
        (agent,) = self.pod["containers"]
        self.manifest_listen_port = agent["readinessProbe"]["httpGet"]["port"]
        self.manifest_peer_port = agent["ports"][0]["containerPort"]
        self.mounts: dict[str, Path] = {}
        volumes = {volume["name"]: volume for volume in self.pod["volumes"]}
        for container in _containers(daemonset):
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]
                place = root / mount["name"]
                place.mkdir(parents=True, exist_ok=True)
                if "configMap" in volume:
                    for key, text in config_map["data"].items():
                        (place / key).write_text(self._replace(text))
                elif "secret" in volume:
                    cluster_key(place / "cluster.key")
                self.mounts[mount["mountPath"]] = place / mount["subPath"] if "subPath" in mount else place

    def _replace(self, text: str) -> str:
        text = text.replace(REGISTRY_URL, self.registry_url)
        text = re.sub(rf":{self.manifest_listen_port}\b", f":{self.listen_port}", text)
        return re.sub(rf":{self.manifest_peer_port}\b", f":{self.peer_port}", text)

    def command(self, container: Mapping[str, Any], node_ip: str = "127.0.0.1") -> list[str]:
        fields = {"status.hostIP": node_ip, "status.podIP": node_ip}
        env = {item["name"]: item.get("value") or fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
               for item in container.get("env", [])}
        argv = []
        for arg in container["args"]:
            arg = self._replace(_expand(arg, env))
            for mount_path in sorted(self.mounts, key=len, reverse=True):
                arg = arg.replace(mount_path, str(self.mounts[mount_path]))
            # The headless Service resolves to the nodes' addresses: here, this one node.
            arg = re.sub(r"=[a-z0-9-]+\.[a-z0-9-]+\.svc\.[a-z.]+:", f"={node_ip}:", arg)
            argv.append(arg)
        assert container["command"] == ["p2pd"]
        return [sys.executable, "-m", "p2pd", *argv]


class ManifestAgent(ManagedProcess):
    """The agent container's command line as a process, ready when its readiness probe answers."""

    name = "p2pd (daemonset.yaml)"
    startup_timeout = 20.0
    _fixed_port = True

    def __init__(self, argv: list[str], port: int, readiness_path: str, log_path: Path) -> None:
        self.argv, self.port, self.readiness_path, self.log_path = argv, port, readiness_path, log_path

    def _argv(self) -> list[str]:
        return self.argv

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready_url(self) -> str:
        return f"{self.url}{self.readiness_path}"

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5).text
        return parse_metrics(text).get((name, frozenset(labels.items())), 0.0)


def _p2pd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pd", *args], capture_output=True, text=True, timeout=60,
                          env=clean_env(), check=False)


@pytest.mark.root
def test_daemonset_command_lines_pull_through_the_agent_on_a_node(
    tmp_path: Path, busybox_layout: OciLayout, reference_registry: ReferenceRegistry, containerd: PrivateContainerd
) -> None:
    daemonset, config_map = _document("DaemonSet"), _document("ConfigMap")
    (init,), (agent_container,) = _pod(daemonset)["initContainers"], _pod(daemonset)["containers"]
    registry_name = REGISTRY_URL.removeprefix("http://")
    ref = f"{registry_name}/lab/busybox:latest"
    pushed = skopeo.copy(busybox_layout.ref("busybox"), f"docker://{reference_registry.host}/lab/busybox:latest")
    image_bytes = sum(blob_sizes(busybox_layout, "busybox").values())

    def keygen(path: Path) -> None:  # docs/operations.md: the Secret holds what `p2pd keygen` wrote
        made = _p2pd("keygen", "--out", str(path))
        assert made.returncode == 0, made.stderr

    node = NodeSimulation(tmp_path / "node", daemonset, config_map, reference_registry.url, keygen)

    # The init container: hosts.toml in the node's hosts directory, p2pd first, the registry last.
    configured = subprocess.run(node.command(init), capture_output=True, text=True, timeout=60, env=clean_env(),
                                check=False)
    assert configured.returncode == 0, configured.stderr
    hosts_dir = node.mounts[init["volumeMounts"][0]["mountPath"]]
    hosts_toml = tomllib.loads((hosts_dir / registry_name / "hosts.toml").read_text())
    assert list(hosts_toml["host"]) == [f"http://127.0.0.1:{node.listen_port}"]
    assert hosts_toml["server"] == reference_registry.url

    # The agent container, swarm and all (peer port, cluster key, peers from "the Service").
    agent = ManifestAgent(node.command(agent_container), node.listen_port,
                          agent_container["readinessProbe"]["httpGet"]["path"], tmp_path / "agent.log")
    with agent:
        liveness = agent_container["livenessProbe"]["httpGet"]["path"]
        assert httpx.get(f"{agent.url}{liveness}", trust_env=False).status_code == 200
        status = httpx.get(f"{agent.url}/debug/status", trust_env=False).json()
        assert status["node"]["address"] == f"127.0.0.1:{node.peer_port}"

        containerd.pull(ref, hosts_dir=hosts_dir, timeout=CTR_TIMEOUT)
        assert containerd.image_digest(ref) == pushed
        assert agent.metric("p2pd_fetched_bytes_total", source="upstream") == image_bytes
        assert agent.metric("p2pd_served_bytes_total") >= image_bytes
        # --log-format=json: stderr is JSON lines; stdout has the one line that says where it listens.
        lines = agent.log_text().splitlines()
        assert [line for line in lines if not line.startswith("{")] == [f"p2pd listening on {agent.url}"]
        assert {json.loads(line)["logger"] for line in lines if line.startswith("{")} >= {"p2pd"}

    # A rolling update replaces the agent: meanwhile the node still pulls, from the registry itself.
    assert not agent.is_running()
    containerd.remove_all()
    containerd.pull(ref, hosts_dir=hosts_dir, timeout=CTR_TIMEOUT)
    assert containerd.image_digest(ref) == pushed
    assert containerd.unpack_check(ref) in ("run", "mount")
