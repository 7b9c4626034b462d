"""Webdataset shards: keys that could escape a folder are refused on write and on read."""

from __future__ import annotations

import io
import tarfile

import pytest

from dalle_pipeline.components.shards import Sample, read_shard, write_shard


@pytest.mark.parametrize("key", ["../escape", "a/b", "/abs", ".hidden", "-rf", "", "x" * 129, "k\x00ey"])
def test_unsafe_keys_are_refused_and_nothing_is_written(tmp_path, key):
    with pytest.raises(ValueError, match="is not a plain name"):
        write_shard(tmp_path / "00000.tar", [Sample(key, b"img", "png", "caption")])
    assert list(tmp_path.iterdir()) == []


def test_a_shard_with_a_traversing_member_is_refused_when_read(tmp_path):
    shard = tmp_path / "crafted.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("../../etc/cron.d/evil.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"img"))
    with pytest.raises(ValueError, match=r"crafted.tar: sample key '../../etc/cron.d/evil' is not a plain name"):
        list(read_shard(shard))


def test_plain_keys_round_trip(tmp_path):
    samples = [Sample("00000000012", b"img", "png", "a caption", {"url": "u"}), Sample("batch_1-x", b"i", "jpg", "b")]
    write_shard(tmp_path / "00000.tar", samples)
    assert [(s.key, s.image_bytes, s.caption) for s in read_shard(tmp_path / "00000.tar")] == [
        ("00000000012", b"img", "a caption"), ("batch_1-x", b"i", "b")]
