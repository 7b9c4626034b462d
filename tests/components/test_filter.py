"""Filter stage: hand-built shards with good and bad samples; each bad one is dropped for its reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dalle_pipeline.components.config import FilterConfig
from dalle_pipeline.components.filter import read_report, run
from dalle_pipeline.components.shards import Sample, read_shard, shard_paths, write_shard

CFG = FilterConfig(min_image_size=16, min_caption_chars=5, max_caption_chars=40)


def _image_bytes(side: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def _sample(key: str, caption: str = "a small red circle", image: bytes | None = None, ext: str = "png") -> Sample:
    return Sample(key, _image_bytes(32) if image is None else image, ext, caption, meta={"url": f"u/{key}"})


# key -> (sample, expected reason)
CASES = {
    "00000000": (_sample("00000000"), "kept"),
    "00000001": (_sample("00000001", caption="   \n"), "empty_caption"),
    "00000002": (_sample("00000002", caption=" abc "), "caption_too_short"),
    "00000003": (_sample("00000003", caption="a" * 41), "caption_too_long"),
    "00000004": (_sample("00000004", image=_image_bytes(8)), "too_small"),
    "00000005": (_sample("00000005", image=b"certainly not an image"), "undecodable"),
    "00010000": (_sample("00010000", image=_image_bytes(32)[:60]), "undecodable"),  # truncated PNG
    "00010001": (_sample("00010001", image=_image_bytes(16, "JPEG"), ext="jpg"), "kept"),
    "00010002": (_sample("00010002", caption="  " + "b" * 40 + "  "), "kept"),  # length after strip
    "00010003": (_sample("00010003", caption="", image=b"junk"), "empty_caption"),  # caption checked first
}


@pytest.fixture()
def shards_dir(tmp_path):
    folder = tmp_path / "download"
    for shard_name, prefix in (("00000.tar", "0000"), ("00001.tar", "0001")):
        write_shard(folder / shard_name, [sample for key, (sample, _) in CASES.items() if key.startswith(prefix)])
    (folder / "00000_stats.json").write_text("{}")  # img2dataset's files beside the shards are ignored
    return folder


def test_each_sample_is_reported_with_its_reason_and_only_good_ones_are_kept(shards_dir, tmp_path):
    result = run(CFG, shards_dir, tmp_path / "curated")

    report = read_report(result.report_path).to_pylist()
    assert {row["key"]: row["reason"] for row in report} == {key: reason for key, (_, reason) in CASES.items()}
    assert all(row["kept"] == (row["reason"] == "kept") for row in report)
    assert result.kept == 3
    assert result.dropped_by_reason == {
        "empty_caption": 2,
        "undecodable": 2,
        "caption_too_long": 1,
        "caption_too_short": 1,
        "too_small": 1,
    }

    assert [path.name for path in shard_paths(result.curated_dir)] == ["00000.tar", "00001.tar"]
    curated = {s.key: s for path in shard_paths(result.curated_dir) for s in read_shard(path)}
    assert sorted(curated) == ["00000000", "00010001", "00010002"]
    for key, sample in curated.items():
        original = CASES[key][0]
        assert (sample.caption, sample.image_bytes, sample.image_ext, sample.meta) == (
            original.caption,
            original.image_bytes,
            original.image_ext,
            original.meta,
        )


def test_a_rerun_replaces_the_previous_output(shards_dir, tmp_path):
    out_dir = tmp_path / "curated"
    write_shard(out_dir / "00007.tar", [_sample("00070000")])  # from some earlier, larger download
    run(CFG, shards_dir, out_dir)

    stricter = run(CFG.model_copy(update={"min_image_size": 20}), shards_dir, out_dir)
    assert [path.name for path in shard_paths(out_dir)] == ["00000.tar", "00001.tar"]
    assert stricter.kept == 2 and stricter.dropped_by_reason["too_small"] == 2
    assert read_report(stricter.report_path).num_rows == len(CASES)


def test_a_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        run(CFG, tmp_path / "empty", tmp_path / "curated")
    assert not (tmp_path / "curated").exists()
