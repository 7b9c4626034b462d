"""Local sources: each kind, made here with its bad items, through the real ingest and filter."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_pipeline.components import sorted_runs
from dalle_pipeline.components.config import DataConfig, DownloadConfig, FilterConfig, resolve
from dalle_pipeline.components.filter import read_report
from dalle_pipeline.components.filter import run as filter_run
from dalle_pipeline.components.download.run import ATTEMPTED_SPILL
from dalle_pipeline.components.filter.run import require_usable
from dalle_pipeline.components.shards import iter_samples
from dalle_pipeline.components.sources import run as ingest
from dalle_pipeline.components.sources import kinds, listing, source_kind
from dalle_pipeline.flows.cli import main

SIZE = 32
RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def encode(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def halves(top: tuple, bottom: tuple, size=(40, 60)) -> Image.Image:
    """Upper half `top`, lower half `bottom`."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[: size[1] // 2], pixels[size[1] // 2 :] = top, bottom
    return Image.fromarray(pixels)


def rotated_with_exif() -> bytes:
    """Stored sideways (left red, right blue) with EXIF orientation 6: shown upright, red on top."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30], pixels[:, 30:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(Image.fromarray(pixels), exif=exif)


def ingest_and_filter(tmp_path, data: DataConfig, **download):
    downloaded = ingest(data, DownloadConfig(samples_per_shard=4, **download), tmp_path / "dl", SIZE)
    curated = filter_run(FilterConfig(), tmp_path / "dl", tmp_path / "cur")
    reasons = {row["url"]: row["reason"] for row in read_report(curated.report_path).to_pylist()}
    samples = {sample.meta["url"]: sample for sample in iter_samples(curated.curated_dir)}
    return downloaded, curated, reasons, samples


@pytest.fixture
def folder(tmp_path):
    """A folder with every kind of good and bad item the issue names."""
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    jpeg = encode(halves(RED, BLUE), "JPEG", quality=95)
    files = {
        "red.png": encode(halves(RED, RED)), "red.txt": b"a red square",
        "sub/rgba.png": encode(Image.new("RGBA", (48, 48), (0, 0, 255, 0))), "sub/rgba.json": b'{"caption": "clear"}',
        "palette.gif": encode(halves(GREEN, BLUE).convert("P"), "GIF"),
        "grey.png": encode(Image.new("L", (40, 40), 128)), "grey.txt": b"grey",
        "deep.png": encode(Image.fromarray(np.full((40, 40), 65535, np.uint16))), "deep.txt": b"sixteen-bit white",
        "upright.png": rotated_with_exif(), "upright.txt": b"red over blue",
        "mapped.jpg": jpeg,
        "zero.jpg": b"", "zero.txt": b"nothing",
        "cut.jpg": jpeg[: len(jpeg) // 2], "cut.txt": b"truncated",
        "page.png": b"<html>not a picture</html>", "page.txt": b"html",
        "orphan.txt": b"a caption without its image",
        "uncaptioned.png": encode(halves(RED, GREEN)),
        "latin.png": encode(halves(BLUE, BLUE)), "latin.txt": "caf\u00e9".encode("latin-1"),
        "notes.md": b"# my pictures",
        "captions.csv": b"file_name,caption\nmapped.jpg,\"red, then blue\"\npalette.gif,palette\n",
        ".DS_Store": b"finder",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(halves(RED, RED)))
    os.symlink(outside, root / "escape.png")
    (root / "escape.txt").write_bytes(b"out of the folder")
    os.symlink(root / "red.png", root / "inside.png")
    (root / "inside.txt").write_bytes(b"a link within the folder")
    return root


def test_a_folder_keeps_every_readable_pair_and_gives_every_other_item_one_reason(folder, tmp_path):
    data = DataConfig(source=str(folder))
    assert source_kind(data) == "folder"
    downloaded, curated, reasons, samples = ingest_and_filter(tmp_path, data)

    assert reasons == {
        "red.png": "duplicate", "sub/rgba.png": "kept", "palette.gif": "kept", "grey.png": "kept", "deep.png": "kept",
        "upright.png": "kept", "mapped.jpg": "kept", "inside.png": "kept",
        "zero.jpg": "empty_image", "cut.jpg": "truncated_image", "page.png": "not_an_image",
        "orphan.txt": "missing_image", "uncaptioned.png": "missing_caption", "latin.png": "caption_not_utf8",
        "notes.md": "unknown_file", "escape.png": "outside_source",
    }  # the captions file and .DS_Store are no items; every other file is one row; inside.png is red.png's bytes
    assert downloaded.new_urls == len(reasons)
    assert samples["mapped.jpg"].caption == "red, then blue" and samples["palette.gif"].caption == "palette"
    assert samples["sub/rgba.png"].caption == "clear"
    for sample in samples.values():
        assert sample.image().size == (SIZE, SIZE) and sample.image().mode == "RGB"
    assert (samples["sub/rgba.png"].pixels() == 255).all()  # a transparent image lies over white
    assert (samples["deep.png"].pixels() == 255).all()  # 16-bit white is 8-bit white, not clipped noise
    upright = samples["upright.png"].pixels().astype(int)
    assert upright[:12, :, 0].mean() > 180 and upright[-12:, :, 2].mean() > 180  # EXIF applied: red on top
    assert samples["inside.png"].meta["original_width"] == 40 and samples["inside.png"].meta["original_height"] == 60
    assert curated.kept == 7


def test_a_folder_that_grows_adds_only_its_new_files(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sorted_runs, "SPILL_ENTRIES", 2)  # the ids already ingested: in files past 2, as past 64k
    spilled, write = [], sorted_runs.SortedRuns._write
    monkeypatch.setattr(sorted_runs.SortedRuns, "_write",
                        lambda self, keys, values: spilled.append(self.spill_dir.name) or write(self, keys, values))
    data = DataConfig(source=str(folder))
    ingest_and_filter(tmp_path, data)
    again = ingest(data, DownloadConfig(samples_per_shard=4), tmp_path / "dl", SIZE)
    assert again.new_urls == 0 and len(again.batches) == 1
    (folder / "new.png").write_bytes(encode(halves(GREEN, GREEN)))
    (folder / "new.txt").write_bytes(b"green")
    grown = ingest(data, DownloadConfig(samples_per_shard=4), tmp_path / "dl", SIZE)
    assert grown.new_urls == 1 and [batch.name for batch in grown.batches] == ["batch-00000", "batch-00001"]
    assert ATTEMPTED_SPILL in spilled and not (tmp_path / "dl" / ATTEMPTED_SPILL).exists()
    curated = filter_run(FilterConfig(), tmp_path / "dl", tmp_path / "cur")
    assert curated.kept == 8 and curated.reused_shards >= 1


def test_a_folder_source_is_listed_a_folder_at_a_time_in_the_order_of_its_sorted_paths(tmp_path, monkeypatch):
    """No list of the source's paths on the driver: each folder's names are read, sorted and handed on (in pieces
    of 3 here, of 4096 in use), giving the items in the order of their sorted paths, part by part (`a/x` before
    `a-b/y` before `a.png`), each caption file without its image named (`x.PNG` counts, `c.d.txt` wants
    `c.d.<image>`), a file whose name is not UTF-8 named too (no id could hold it); the kind is told at the first
    image, without walking the rest."""
    monkeypatch.setattr(listing, "FOLDER_BLOCK", 3)
    root = tmp_path / "pictures"
    files = ["a/x.png", "a/x.txt", "a/b/q.txt", "a-b/y.png", "a-b/y.json", "a.png", "a.txt", "a0.jpg", "x.PNG",
             "x.txt", "c.d.png", "c.d.txt", "c.txt", "B/k.webp", "z.txt", "é.png", ".hidden/h.png", "Thumbs.db"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "a").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")  # Latin-1 bytes in a name
    items = list(kinds.items("folder", DataConfig(source=str(root))))
    assert [item.item_id for item in items] == ["B/k.webp", "a/caf\ufffd.png", "a/b/q.txt", "a/x.png", "a-b/y.png",
                                                "a.png", "a0.jpg", "c.d.png", "c.txt", "x.PNG", "z.txt", "é.png"]
    assert {item.item_id: item.problem for item in items if item.problem in ("unreadable_name", "missing_image")} == {
        "a/caf\ufffd.png": "unreadable_name", "a/b/q.txt": "missing_image", "c.txt": "missing_image",
        "z.txt": "missing_image"}

    scanned, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scanned.append(Path(path)) or scandir(path))
    assert source_kind(DataConfig(source=str(root))) == "folder" and set(scanned) == {root, root / "B"}  # B/k.webp


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_captions_file_gives_what_a_dict_of_its_rows_gives(tmp_path, monkeypatch, kind):
    """Read as a stream into sorted arrays a few rows a block: the caption of a relative path, else of the bare
    name, the last row of a repeated name, U+FFFD for bytes that are not UTF-8; rows without a caption skipped."""
    from dalle_pipeline.components.sources import captions_file

    monkeypatch.setattr(captions_file, "ROWS_BLOCK", 3)
    rows = [("b.png", "bee"), ("sub/a.png", "a in sub"), ("a.png", "bare a"), ("c.png", "first c"), ("z.png", None),
            ("sub/b.png", "b in sub, quoted"), ("c.png", "second c"), ("é.png", "accent"), ("d.png", "")]
    if kind == "csv":
        lines = [b"file_name,caption"] + [f'{name},"{text}"'.encode() if text is not None else f"{name}".encode()
                                          for name, text in rows]
        data = b"\n".join(lines + [b"bad.png,caf\xe9"]) + b"\n"
    else:
        lines = [json.dumps({"file_name": name, **({"caption": text} if text is not None else {})}).encode()
                 for name, text in rows]
        data = b"\n".join(lines + [b'{"file_name": "bad.png", "caption": "caf\xe9"}', b""])
    (tmp_path / f"captions.{kind}").write_bytes(data)
    expected = {name: text for name, text in rows if text is not None} | {"bad.png": "caf\ufffd"}
    for hashed in ("blake2b", "two values"):  # with the names' hashes colliding, told apart by the names
        if hashed == "two values":
            monkeypatch.setattr(captions_file, "name_key", lambda name: len(name) % 2)
        found = captions_file.read_captions_file(tmp_path, "caption")
        assert len(found) == 9 and len(found.captions) == 9
        for relative in ["b.png", "sub/a.png", "sub/b.png", "sub/c.png", "deep/er/a.png", "c.png", "z.png", "é.png",
                         "d.png", "bad.png", "sub/missing.png", "missing.png"]:
            name = relative.rsplit("/", 1)[-1]
            assert found.get(relative, name) == expected.get(relative, expected.get(name)), (hashed, relative)
    (tmp_path / f"captions.{kind}").write_bytes(b"name,text\nx.png,x\n" if kind == "csv" else b'{"name": "x"}\n')
    with pytest.raises(ValueError, match=f"captions.{kind}: the captions file needs a file name column"):
        captions_file.read_captions_file(tmp_path, "caption")


def test_webdataset_shards_such_as_an_img2dataset_output_are_read_as_they_are(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    members = {
        "000000000.jpg": encode(halves(RED, RED), "JPEG"), "000000000.txt": b"red",
        "000000000.json": json.dumps({"url": "https://example.com/red.jpg", "key": "000000000"}).encode(),
        "000000001.png": encode(halves(BLUE, BLUE)), "000000001.json": b'{"caption": "blue from json"}',
        "000000002.png": encode(halves(GREEN, GREEN)),
        "000000003.txt": b"no image",
        "000000004.webp": b"RIFF....WEBPdamaged", "000000004.txt": b"broken webp",
    }
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    (shards / "00000.parquet").write_bytes(b"img2dataset's own table beside it")  # not read: .tar wins
    data = DataConfig(source=str(shards))
    assert source_kind(data) == "webdataset"
    _, curated, reasons, samples = ingest_and_filter(tmp_path, data)
    assert reasons == {"00000.tar/000000000": "kept", "00000.tar/000000001": "kept",
                       "00000.tar/000000002": "missing_caption", "00000.tar/000000003": "missing_image",
                       "00000.tar/000000004": "corrupt_image"}
    assert samples["00000.tar/000000001"].caption == "blue from json"
    assert samples["00000.tar/000000000"].meta["source_url"] == "https://example.com/red.jpg"

    # the driver lists a shard and reads its captions; an image is read by the task that fits it (where
    # it lies goes to the task, not its bytes), so a tar cut short after the listing is an unreadable image
    import pickle

    from dalle_pipeline.components.sources.kinds import items

    listed = {item.item_id: item for item in items("webdataset", data)}
    red = listed["00000.tar/000000000"]
    assert red.read() == members["000000000.jpg"] and red.caption == "red"
    assert members["000000000.jpg"] not in pickle.dumps(red)  # what a Ray task receives
    with open(shards / "00000.tar", "r+b") as tar:
        tar.truncate(1024)
    with pytest.raises(OSError, match="cut short"):
        listed["00000.tar/000000002"].read()


def test_parquet_with_the_images_inside_as_datasets_exports_it(tmp_path, monkeypatch):
    images = [encode(halves(RED, RED)), encode(halves(BLUE, BLUE)), None, encode(halves(GREEN, GREEN))]
    struct = pa.array([None if data is None else {"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": struct, "text": ["red", "blue", "gone", None]})
    pq.write_table(table, tmp_path / "train-00000.parquet", row_group_size=2)
    data = DataConfig(source=str(tmp_path / "train-00000.parquet"))  # `text` is read as the captions, unasked
    assert source_kind(data) == "parquet"
    _, _, reasons, samples = ingest_and_filter(tmp_path, data)
    assert reasons == {"train-00000.parquet#0": "kept", "train-00000.parquet#1": "kept",
                       "train-00000.parquet#2": "missing_image", "train-00000.parquet#3": "missing_caption"}
    assert samples["train-00000.parquet#1"].pixels()[..., 2].mean() > 180

    # the driver reads the captions; each image is read by the task that fits it, a few rows at a time
    import pickle

    from dalle_pipeline.components.sources import kinds

    monkeypatch.setattr(kinds, "PARQUET_READ_ROWS", 1)
    listed = list(kinds.items("parquet", data))
    assert [item.caption for item in listed] == ["red", "blue", "gone", None]
    assert images[1] not in pickle.dumps(listed[1])  # what a Ray task receives
    assert [item.read() for item in listed] == images  # in row order, each row read once
    assert listed[0].read() == images[0]  # and back: the row group read again

    binary = tmp_path / "binary"
    binary.mkdir()
    pq.write_table(pa.table({"png": pa.array(images[:2], pa.binary()), "caption": ["r", "b"]}), binary / "a.parquet")
    assert source_kind(DataConfig(source=str(binary), image_col="png")) == "parquet"
    with pytest.raises(ValueError, match=r"neither images \(a column 'image'.*columns are \['png', 'caption'\]"):
        source_kind(DataConfig(source=str(binary / "a.parquet")))


def test_coco_captions_with_their_image_folder_found_beside_them(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "1.jpg").write_bytes(encode(halves(RED, RED), "JPEG"))
    (tmp_path / "val2017" / "2.jpg").write_bytes(encode(halves(BLUE, BLUE), "JPEG"))
    (tmp_path / "val2017" / "4.jpg").write_bytes(encode(halves(GREEN, GREEN), "JPEG"))
    document = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}, {"id": 3, "file_name": "3.jpg"},
                   {"id": 4, "file_name": "4.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a red picture"},
                        {"id": 11, "image_id": 1, "caption": "something red"},
                        {"id": 12, "image_id": 2, "caption": "a blue picture"},
                        {"id": 13, "image_id": 3, "caption": "its file is gone"},
                        {"id": 14, "image_id": 99, "caption": "no such image"}],
    }
    annotations = tmp_path / "annotations" / "captions_val2017.json"
    annotations.write_text(json.dumps(document))
    data = DataConfig(source=str(annotations))
    assert source_kind(data) == "coco"
    _, _, reasons, samples = ingest_and_filter(tmp_path, data)
    assert reasons == {"1.jpg": "kept", "2.jpg": "kept", "3.jpg": "missing_image", "4.jpg": "missing_caption",
                       "annotation:14": "missing_image"}
    assert samples["1.jpg"].caption == "a red picture"
    assert samples["1.jpg"].meta["captions"] == ["a red picture", "something red"]

    (tmp_path / "val2017" / "1.jpg").rename(tmp_path / "1.jpg")
    with pytest.raises(FileNotFoundError, match=r"cannot find the folder of its images.*set data.images_dir"):
        ingest(data, DownloadConfig(), tmp_path / "dl2", SIZE)


@pytest.mark.parametrize(("files", "message"), [
    ({"notes.md": b"x", "a/b.doc": b"y"}, r"a folder with no images, .tar shards, .parquet files or URL lists "
                                          r"\(2 files: a/b.doc, notes.md\)"),
    ({}, r"a folder with no images.*\(0 files: nothing\)"),
])
def test_a_folder_that_is_no_source_is_refused_with_what_was_found(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        source_kind(DataConfig(source=str(tmp_path)))


def test_a_file_that_is_no_source_or_a_missing_one_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model.ckpt: cannot tell what this file is.*set data.format"):
        source_kind(DataConfig(source=str(tmp_path / "model.ckpt")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        source_kind(DataConfig(source=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="format 'folder' needs a folder"):
        source_kind(DataConfig(source=str(tmp_path / "model.ckpt"), format="folder"))


def test_a_source_with_nothing_usable_fails_with_the_counts(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "a.txt").write_bytes(b"empty image")
    (root / "b.png").write_bytes(encode(halves(RED, RED)))
    _, curated, _, _ = ingest_and_filter(tmp_path, DataConfig(source=str(root)))
    with pytest.raises(ValueError, match=r"no usable image-caption pair.*of 2 items, (empty_image 1, missing_caption 1|"
                                         r"missing_caption 1, empty_image 1)"):
        require_usable(curated)


def test_check_data_reports_counts_and_examples_and_fails_only_when_nothing_is_usable(folder, tmp_path, capsys):
    assert main(["check-data", str(folder), "--out", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert "folder source: 16 items, 7 usable" in out
    assert any(line.split()[:2] == ["empty_image", "1"] and "zero.jpg" in line for line in out.splitlines())
    assert (tmp_path / "check" / "curated" / "filter_report.parquet").is_file()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lonely.png").write_bytes(encode(halves(RED, RED)))
    assert main(["check-data", str(bad), "--out", str(tmp_path / "check-bad")]) == 1
    assert "no usable image-caption pair" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["check-data", str(tmp_path / "empty")]) == 2
    assert "a folder with no images" in capsys.readouterr().err


def test_user_data_gets_safe_defaults_and_the_shapes_corpus_keeps_its_own(tmp_path):
    shapes = resolve("tiny")
    assert shapes.download_settings().allow_file_urls is True and shapes.filter_settings().drop_exact_duplicates is False
    yours = resolve("tiny", {"data.source": str(tmp_path)})
    assert yours.download_settings().allow_file_urls is False and yours.filter_settings().drop_exact_duplicates is True
    chosen = resolve("tiny", {"data.source": str(tmp_path), "filter.drop_exact_duplicates": False})
    assert chosen.filter_settings().drop_exact_duplicates is False


def _colour_folder(root, count: int):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (root / f"{index:03d}.png").write_bytes(encode(halves(colour, colour)))
        (root / f"{index:03d}.txt").write_text(f"picture number {index}")


def test_a_held_out_share_stays_out_of_training_and_stays_put_as_the_corpus_grows(tmp_path):
    from dalle_pipeline.components.evaluate.evaluation_set import holdout_evaluation_set
    from dalle_pipeline.components.shards import HOLDOUT_DIR, holdout_rank

    folder = tmp_path / "pictures"
    _colour_folder(folder, 40)
    data = DataConfig(source=str(folder))
    ingest(data, DownloadConfig(samples_per_shard=16), tmp_path / "dl", SIZE)
    first = filter_run(FilterConfig(), tmp_path / "dl", tmp_path / "cur", holdout_fraction=0.25)
    held = {s.meta["url"] for s in iter_samples(tmp_path / "cur" / HOLDOUT_DIR)}
    trained = {s.meta["url"] for s in iter_samples(tmp_path / "cur")}
    assert held == {f"{i:03d}.png" for i in range(40) if holdout_rank(f"{i:03d}.png") < 0.25} and held
    assert not held & trained and len(held | trained) == 40
    assert (first.kept, first.held_out) == (len(trained), len(held))
    reasons = {row["url"]: row["reason"] for row in read_report(first.report_path).to_pylist()}
    assert {url for url, reason in reasons.items() if reason == "held_out"} == held

    # the corpus grows, and one new file copies a held-out picture: it is a duplicate, never a training sample
    copied = sorted(held)[0]
    (folder / "copy.png").write_bytes((folder / copied).read_bytes())
    (folder / "copy.txt").write_text("a copy")
    ingest(data, DownloadConfig(samples_per_shard=16), tmp_path / "dl", SIZE)
    grown = filter_run(FilterConfig(), tmp_path / "dl", tmp_path / "cur", holdout_fraction=0.25)
    assert {s.meta["url"] for s in iter_samples(tmp_path / "cur" / HOLDOUT_DIR)} == held  # stayed put
    assert {row["url"]: row["reason"] for row in read_report(grown.report_path).to_pylist()}["copy.png"] == "duplicate"

    evaluation = holdout_evaluation_set(tmp_path / "cur", SIZE, num_prompts=3, max_references=5)
    expected = sorted(held, key=holdout_rank)[:5]
    assert evaluation.ids == expected and evaluation.references.shape == (5, SIZE, SIZE, 3)
    assert evaluation.prompts == [f"picture number {int(url[:3])}" for url in expected[:3]]
    assert evaluation.retrieval_pool == [f"picture number {int(url[:3])}" for url in expected]
    champions = holdout_evaluation_set(tmp_path / "cur", SIZE, 3, 5, ids=[expected[4], "gone.png", expected[0]])
    assert champions.ids == [expected[4], expected[0]]  # the champion's items, as far as the corpus holds them
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a published prompt\n\nanother one\n")
    published = holdout_evaluation_set(tmp_path / "cur", SIZE, 3, 5, prompts_file=prompts_file)
    assert published.prompts == ["a published prompt", "another one"] and len(published.references) == 5
    with pytest.raises(ValueError, match="0 held-out samples.*raise data.holdout_fraction"):
        holdout_evaluation_set(tmp_path / "nothing", SIZE, 3, 5)


def test_a_source_fingerprint_changes_when_a_file_is_added_grows_or_is_rewritten(tmp_path):
    from dalle_pipeline.components.sources.fingerprint import source_fingerprint, source_id

    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a" * 10)
    seen = source_fingerprint(folder)
    assert source_fingerprint(folder) == seen  # a second look at the same files
    (folder / "b.png").write_bytes(b"b")
    grown = source_fingerprint(folder)
    assert grown != seen
    (folder / "b.png").write_bytes(b"bb")
    assert source_fingerprint(folder) != grown
    listing = tmp_path / "urls.csv"
    listing.write_text("url,caption\n")
    assert source_fingerprint(listing) != source_fingerprint(folder)
    assert source_id(listing) == source_id(str(listing)) and len(source_id(listing)) == 12
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_fingerprint(tmp_path / "missing")


def test_shards_hold_jpegs_from_256_px_and_pngs_below_unless_told(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    (root / "a.png").write_bytes(encode(halves(RED, BLUE, (300, 300))))
    (root / "a.txt").write_text("red over blue")
    formats = {}
    for size, chosen in ((256, "auto"), (64, "auto"), (256, "png")):
        out = tmp_path / f"dl-{size}-{chosen}"
        ingest(DataConfig(source=str(root)), DownloadConfig(encode_format=chosen), out, size)
        sample = next(iter_samples(out / "batch-00000"))
        formats[size, chosen] = (sample.image_ext, Image.open(io.BytesIO(sample.image_bytes)).format)
    assert formats == {(256, "auto"): ("jpg", "JPEG"), (64, "auto"): ("png", "PNG"), (256, "png"): ("png", "PNG")}


def test_a_url_where_a_path_is_asked_for_is_refused_naming_its_protocol(tmp_path, monkeypatch):
    """data.source=gs://... used to become a local folder named `gs:`; a source on an object store is read there
    (webdataset shards, Parquet with images: tests/components/test_object_store.py), but one whose fsspec package is
    missing is refused naming it, as is an unknown protocol; file:// read."""
    from dalle_pipeline.components.tracking import default_root

    monkeypatch.setenv("DALLE_HOME", (tmp_path / "home").as_uri())
    assert default_root().local == tmp_path / "home"
    with pytest.raises(ValueError, match=r"data.source 'gs://b/photos': .*gcsfs"):
        source_kind(DataConfig(source="gs://b/photos"))
    with pytest.raises(ValueError, match=r"data.source 'nope://b/photos': unknown protocol nope://"):
        source_kind(DataConfig(source="nope://b/photos"))
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")
