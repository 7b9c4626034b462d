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


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_tar_reader_reads_what_tarfile_writes(tmp_path, tar_format):
    from dalle_pipeline.components.shards import tar_members

    members = [("000000001.png", b"\x89PNG" * 300), ("000000001.txt", "café".encode()), ("dir/" + "k" * 150 + ".json", b"{}"),
               ("empty.txt", b""), ("exact.bin", bytes(512))]
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w", format=tar_format, encoding="utf-8") as tar:
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)  # not a regular file: skipped
        for name, data in members:
            if tar_format == tarfile.USTAR_FORMAT and len(name) > 100:
                name = name[:90] + ".json"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(tar_members(shard)) == expected


def test_a_damaged_tar_is_an_error(tmp_path):
    from dalle_pipeline.components.shards import tar_members

    write_shard(tmp_path / "good.tar", [Sample("000000001", b"img" * 1000, "png", "a caption")])
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1500])
    with pytest.raises(ValueError, match="runs past the end"):
        list(tar_members(tmp_path / "cut.tar"))
    damaged = bytearray(data)
    damaged[10] ^= 0xFF
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged tar header at byte 0"):
        list(tar_members(tmp_path / "damaged.tar"))


def _mixed_shard(path):
    """A tar as img2dataset might leave it: PAX headers, an upper-case extension, a key with no image, a stray file."""
    members = [("000000001.jpg", b"\xff\xd8" * 700), ("000000001.txt", "café".encode()),
               ("000000001.json", b'{"url": "u1"}'), ("000000002.txt", b"no image"),
               ("000000003.PNG", b"\x89PNG" * 400), ("000000003.json", b'{"w": 3}'),
               ("README", b"stray"), ("000000004.webp", b"RIFF" * 50), ("000000004.txt", b"last")]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "x" * 600}  # a PAX record longer than a block
            tar.addfile(info, io.BytesIO(data))
    return members


def test_the_tar_reader_reads_only_the_wanted_members_and_asks_about_each_once(tmp_path):
    from dalle_pipeline.components.shards import tar_members

    members = _mixed_shard(tmp_path / "shard.tar")
    asked = []

    def wanted(name):
        asked.append(name)
        return name.endswith(".txt")

    assert list(tar_members(tmp_path / "shard.tar", wanted=wanted)) == [m for m in members if m[0].endswith(".txt")]
    assert asked == [name for name, _ in members]
    assert list(tar_members(tmp_path / "shard.tar", wanted=lambda name: False)) == []
    assert list(tar_members(tmp_path / "shard.tar")) == members


def test_a_damaged_tar_is_an_error_even_when_no_member_is_wanted(tmp_path):
    from dalle_pipeline.components.shards import tar_members

    write_shard(tmp_path / "good.tar", [Sample("000000001", b"img" * 1000, "png", "a caption")])
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1500])
    with pytest.raises(ValueError, match=r"cut.tar: tar member at byte 0 runs past the end of the file"):
        list(tar_members(tmp_path / "cut.tar", wanted=lambda name: False))
    damaged = bytearray(data)
    damaged[3584 + 10] ^= 0xFF  # the caption's header, after the 3000-byte image
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged.tar: damaged tar header at byte 3584"):
        list(tar_members(tmp_path / "damaged.tar", wanted=lambda name: False))


def test_reading_captions_gives_read_shards_samples_without_reading_an_image(tmp_path, monkeypatch):
    from dalle_pipeline.components import shards

    members = _mixed_shard(tmp_path / "00000.tar")
    write_shard(tmp_path / "00001.tar", [Sample("000000009", b"img", "png", "next shard", {"url": "u9"})])
    expected = [(s.key, s.caption, s.meta, s.image_ext) for s in shards.iter_samples(tmp_path)]
    assert [key for key, *_ in expected] == ["000000001", "000000003", "000000004", "000000009"]
    read_sizes = []
    real_read_body = shards._read_body
    monkeypatch.setattr(shards, "_read_body", lambda file, size, *where: read_sizes.append(size) or
                        real_read_body(file, size, *where))
    assert [tuple(text) for text in shards.iter_captions(tmp_path)] == expected
    image_sizes = {len(data) for name, data in members if name.rpartition(".")[2].lower() in shards.IMAGE_EXTENSIONS}
    assert read_sizes and not image_sizes & set(read_sizes)


def test_reading_captions_refuses_the_keys_read_shard_refuses(tmp_path):
    from dalle_pipeline.components.shards import read_captions

    with tarfile.open(tmp_path / "crafted.tar", "w") as tar:
        info = tarfile.TarInfo("../evil.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"img"))
    with pytest.raises(ValueError, match="is not a plain name"):
        list(read_captions(tmp_path / "crafted.tar"))
