"""pytest fixtures for the harness; registered in tests/conftest.py via ``pytest_plugins``.

    reference_registry  function  ReferenceRegistry on a free 127.0.0.1 port (storage in tmp_path)
    busybox_layout      session   OciLayout with tag ``busybox`` (runnable busybox-static image)
    big_layout          session   separate OciLayout: tags ``busybox`` and ``big`` (= busybox + 50 MiB random)
    containerd          function  PrivateContainerd (needs root), namespace ``test``
    seed_process        function  SeedProcess: the seed as a subprocess on a free port (data in tmp_path)
    release, intruder   session   GpgHome signing keys: one a policy trusts, one it does not
    cosign_key          session   an ECDSA P-256 private key, as ``cosign generate-key-pair`` makes

Session layouts are shared: treat them as read-only (copy the directory to modify it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .containerd import PrivateContainerd
from .gpg import GpgHome
from .images import OciLayout, add_random_layer, build_busybox_layout
from .reference_registry import ReferenceRegistry
from .seed_process import SeedProcess

BIG_LAYER_MIB = 50


@pytest.fixture
def reference_registry(tmp_path: Path) -> Iterator[ReferenceRegistry]:
    with ReferenceRegistry(tmp_path / "reference-registry") as registry:
        yield registry


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    return build_busybox_layout(tmp_path_factory.mktemp("busybox-image"))


@pytest.fixture(scope="session")
def big_layout(tmp_path_factory: pytest.TempPathFactory, busybox_layout: OciLayout) -> OciLayout:
    layout = OciLayout(tmp_path_factory.mktemp("big-image") / "oci")
    shutil.copytree(busybox_layout.path, layout.path)
    add_random_layer(layout, "busybox", "big", BIG_LAYER_MIB)
    return layout


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[PrivateContainerd]:
    with PrivateContainerd(tmp_path / "containerd") as ctd:
        yield ctd


@pytest.fixture
def seed_process(tmp_path: Path) -> Iterator[SeedProcess]:
    with SeedProcess(tmp_path / "seed-data") as seed:
        yield seed


@pytest.fixture(scope="session")
def release() -> Iterator[GpgHome]:
    with GpgHome("Release <release@example.com>") as home:
        yield home


@pytest.fixture(scope="session")
def intruder() -> Iterator[GpgHome]:
    with GpgHome("Intruder <intruder@example.com>") as home:
        yield home


@pytest.fixture(scope="session")
def cosign_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
