"""``make bench-chunks`` measures the chunk sizes it names: a size the blob would be cut smaller
than (``chunk_size_for``) is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

from p2pd.oci.chunkmap import chunk_size_for
from tests.bench import chunk_size
from tests.bench.common import MIB


def test_the_default_sizes_are_the_chunks_the_default_blob_is_cut_in() -> None:
    parser = chunk_size._parser()
    args = parser.parse_args([])
    for text in args.sizes.split(","):
        size = chunk_size.parse_size(text)
        assert chunk_size_for(args.blob_mib * MIB, size) == size


def test_a_size_the_blob_would_be_cut_smaller_than_is_refused(tmp_path: Path) -> None:
    said: list[str] = []
    assert chunk_size.main(["--out", str(tmp_path / "b.md"), "--sizes", "256K,4M", "--blob-mib", "128"],
                           log=said.append) == 2
    assert said == ["--sizes: a 128 MiB blob is cut in 256 KiB chunks, not 4096 (chunk_size_for); "
                    "use a blob of at least 2048 MiB"]
    assert not (tmp_path / "b.md").exists()
