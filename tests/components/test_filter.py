"""Filter stage: hand-built download batches with good and bad samples; each bad one is dropped for its reason."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from dalle_pipeline.components.clip.model import LOCAL_DIR, ClipScorer, architecture, register_architecture
from dalle_pipeline.components.config import ClipConfig, FilterConfig
from dalle_pipeline.components.filter import NearDuplicateIndex, perceptual_hash, read_report, run
from dalle_pipeline.components.shards import Sample, iter_samples, read_shard, shard_paths, write_shard

CFG = FilterConfig(min_image_size=16, min_caption_chars=5, max_caption_chars=40, caption_blocklist=["nsfw", "for sale"],
                   near_duplicate_distance=4)


def _picture(seed: int, side: int = 32) -> Image.Image:
    """A distinct picture per seed: a few random rectangles and ellipses."""
    rng = random.Random(seed)
    image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(side - 8), rng.randrange(side - 8)
        box = (x0, y0, x0 + rng.randrange(6, side - x0), y0 + rng.randrange(6, side - y0))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def _sample(key: str, caption: str = "a small red circle", image: bytes | None = None, ext: str = "png",
            original: tuple[int, int] = (64, 64), seed: int | None = None) -> Sample:
    image = _encode(_picture(int(key) if seed is None else seed)) if image is None else image
    meta = {"url": f"https://e.com/{key}", "sha256": hashlib.sha256(image).hexdigest(),
            "original_width": original[0], "original_height": original[1]}
    return Sample(key, image, ext, caption, meta=meta)


# key -> (sample, expected reason); batch keys get the batch number in front
CASES = {
    "000000000": (_sample("000000000"), "kept"),
    "000000001": (_sample("000000001", caption="   \n"), "empty_caption"),
    "000000002": (_sample("000000002", caption=" abc "), "caption_too_short"),
    "000000003": (_sample("000000003", caption="a" * 41), "caption_too_long"),
    "000000004": (_sample("000000004", caption="caf\ufffd au lait"), "caption_not_utf8"),
    "000000005": (_sample("000000005", caption="Poster FOR  SALE now".replace("  ", " ")), "blocked_caption"),
    "000000006": (_sample("000000006", original=(8, 64)), "too_small"),
    "000000007": (_sample("000000007", original=(200, 50)), "aspect_ratio"),
    "000000008": (_sample("000000008", image=b"certainly not an image"), "undecodable"),
    "000010000": (_sample("000010000", image=_encode(_picture(9))[:60]), "undecodable"),  # truncated PNG
    "000010001": (_sample("000010001", image=_encode(_picture(11), "JPEG"), ext="jpg"), "kept"),
    "000010002": (_sample("000010002", caption="  " + "b" * 40 + "  "), "kept"),  # length after strip
    "000010003": (_sample("000010003", caption="", image=b"junk"), "empty_caption"),  # caption checked first
    "000010004": (_sample("000010004", caption="a sale for nsfwish minds"), "kept"),  # whole words only
    "000010005": (_sample("000010005", seed=0, caption="same bytes, other url"), "duplicate"),
    "000010006": (_sample("000010006", image=_encode(_picture(11).resize((48, 48)), "JPEG"), ext="jpg"),
                  "near_duplicate"),  # 000010001 resized and re-encoded
}


def _write_batch(download_dir: Path, number: int, shards: dict[str, list[Sample]], failures: int = 0) -> Path:
    """A finished download batch as the download stage leaves it, with img2dataset's per-URL parquet."""
    batch = download_dir / f"batch-{number:05d}"
    for shard_name, samples in shards.items():
        write_shard(batch / f"{shard_name}.tar", samples)
        rows = [{"key": s.key, "url": s.meta["url"], "status": "success", "error_message": None} for s in samples]
        rows += [{"key": f"{shard_name}9999{i}", "url": f"https://e.com/gone/{shard_name}/{i}",
                  "status": "failed_to_download", "error_message": "http_404"} for i in range(failures)]
        pq.write_table(pa.Table.from_pylist(rows), batch / f"{shard_name}.parquet")
    (batch / "_SUCCESS").write_text(json.dumps({"settings": {}, "urls": 0}))
    return batch


@pytest.fixture()
def download_dir(tmp_path):
    folder = tmp_path / "download"
    shards = {name: [sample for key, (sample, _) in CASES.items() if key.startswith(prefix)]
              for name, prefix in (("00000", "00000"), ("00001", "00001"))}
    _write_batch(folder, 0, shards, failures=1)
    (folder / ".batch-00001.partial").mkdir()  # an unfinished batch is never read
    write_shard(folder / ".batch-00001.partial" / "00000.tar", [_sample("000000000")])
    return folder


def test_each_sample_is_reported_with_its_reason_and_only_good_ones_are_kept(download_dir, tmp_path):
    result = run(CFG, download_dir, tmp_path / "curated")

    report = read_report(result.report_path).to_pylist()
    by_key = {row["key"]: row for row in report}
    assert {k: row["reason"] for k, row in by_key.items() if row["stage"] == "filter"} == {
        "00000" + key: reason for key, (_, reason) in CASES.items()
    }
    assert {k: row["reason"] for k, row in by_key.items() if row["stage"] == "download"} == {
        "00000000009999" + "0": "http_404", "00000000019999" + "0": "http_404"
    }
    assert all(row["kept"] == (row["reason"] == "kept") for row in report)
    assert result.kept == 4
    assert result.download_failures_by_reason == {"http_404": 2}
    assert sum(result.dropped_by_reason.values()) == len(CASES) - 4 and result.dropped_by_reason["undecodable"] == 2
    assert by_key["00000000000000"]["sha256"] == CASES["000000000"][0].meta["sha256"]
    assert by_key["00000000000000"]["phash"] == perceptual_hash(_picture(0))

    assert [path.name for path in shard_paths(result.curated_dir)] == ["batch-00000-00000.tar", "batch-00000-00001.tar"]
    curated = {s.key: s for path in shard_paths(result.curated_dir) for s in read_shard(path)}
    assert sorted(curated) == ["00000000000000", "00000000010001", "00000000010002", "00000000010004"]
    for key, sample in curated.items():
        original = CASES[key.removeprefix("00000")][0]
        assert (sample.caption, sample.image_bytes, sample.image_ext, sample.meta) == (
            original.caption, original.image_bytes, original.image_ext, original.meta)


@pytest.mark.parametrize("spill", [False, True], ids=["indexes-in-memory", "indexes-in-files"])
def test_a_rerun_reuses_finished_shards_and_a_new_batch_is_deduplicated_against_them(download_dir, tmp_path,
                                                                                     monkeypatch, spill):
    if spill:  # every run of the duplicate indexes past one entry in files, merged one entry at a time
        from dalle_pipeline.components import sorted_runs

        monkeypatch.setattr(sorted_runs, "SPILL_ENTRIES", 1)
        monkeypatch.setattr(sorted_runs, "MERGE_CHUNK", 1)
        written, write = [], sorted_runs.SortedRuns._write

        def recorded(self, keys, values):
            written.append(len(keys))
            return write(self, keys, values)

        monkeypatch.setattr(sorted_runs.SortedRuns, "_write", recorded)
    out_dir = tmp_path / "curated"
    write_shard(out_dir / "batch-00007-00000.tar", [_sample("000070000")])  # from some earlier download folder
    first = run(CFG, download_dir, out_dir)
    assert first.reused_shards == 0 and not (out_dir / "batch-00007-00000.tar").exists()
    first_report = read_report(first.report_path)

    again = run(CFG, download_dir, out_dir)
    assert again.reused_shards == 2 and read_report(again.report_path).equals(first_report)

    # the next crawl brings a copy of a kept image (new URL), a near copy, and a new picture
    _write_batch(download_dir, 1, {"00000": [
        _sample("000000000", seed=0, caption="the first image, crawled again"),
        _sample("000000001", image=_encode(_picture(10).resize((40, 40)), "JPEG"), ext="jpg", caption="picture ten"),
        _sample("000000002", seed=99, caption="a brand new picture"),
    ]})
    grown = run(CFG, download_dir, out_dir)
    assert grown.reused_shards == 2
    new_rows = {row["key"]: row["reason"] for row in read_report(grown.report_path).to_pylist()
                if row["key"].startswith("00001")}
    # picture 0 was kept in the first run; picture 10 is new, however close its pixels are to others
    assert new_rows == {"00001000000000": "duplicate", "00001000000001": "kept", "00001000000002": "kept"}
    assert grown.kept == first.kept + 2

    stricter = run(CFG.model_copy(update={"min_image_size": 100}), download_dir, out_dir)
    assert stricter.reused_shards == 0 and stricter.kept == 0 and stricter.dropped_by_reason["too_small"] > 0
    assert sum(1 for _ in iter_samples(out_dir)) == 0
    assert not (out_dir / "_dedup_spill").exists()  # scratch: gone with the stage
    if spill:
        assert written, "no run went to a file"


def test_perceptual_hash_is_near_for_copies_and_far_for_other_pictures():
    base = _picture(3, 64)
    copies = [base.resize((32, 32)), Image.open(io.BytesIO(_encode(base, "JPEG"))), base.resize((96, 96))]
    others = [_picture(seed, 64) for seed in range(20, 40)]
    distance = lambda a, b: (perceptual_hash(a) ^ perceptual_hash(b)).bit_count()  # noqa: E731
    assert max(distance(base, copy) for copy in copies) <= 4
    assert min(distance(base, other) for other in others) > 8


def test_near_duplicate_index_finds_exactly_what_a_full_scan_finds(tmp_path):
    rng = np.random.default_rng(0)
    stored = [int(v) for v in rng.integers(0, 2**64, 300, dtype=np.uint64)]  # the top bit set in half of them
    flips = zip(stored[50:100], rng.integers(0, 64, 50), rng.integers(0, 64, 50))
    queries = stored[:50] + [v ^ (1 << int(b)) ^ (1 << int(c)) for v, b, c in flips]
    queries += [int(v) for v in rng.integers(0, 2**64, 100, dtype=np.uint64)]
    for max_distance, band_counts in ((0, [1]), (2, [1, 2, 3]), (5, [2, 3, 6])):
        expected = [any((query ^ value).bit_count() <= max_distance for value in stored) for query in queries]
        # exact bands (d + 1), or fewer probed with their near values; the second layout's runs in files; the
        # band tables searched one at a time, or side by side on three threads
        for bands, spill, threads in zip(band_counts, (None, tmp_path / f"spill-{max_distance}", None), (1, 3, 3)):
            index = NearDuplicateIndex(max_distance, bands=bands, spill_dir=spill, threads=threads)
            assert index.threads == min(bands, threads)
            for table in index.tables:  # runs past 50 hashes in files, merged 7 at a time
                table.spill_entries, table.merge_chunk = 50, 7
            for start in range(0, len(stored), 37):  # shard by shard: runs of 37, merged as they come
                index.add(stored[start : start + 37])
            assert len(index) == len(stored) and len(index.tables[0].runs) <= 9  # log2(300) runs at most
            assert index.contains_near(queries).tolist() == expected, (max_distance, bands)
            assert spill is None or len(list(spill.rglob("*.keys.npy"))) == bands  # runs of 259 (a file) and 41
        assert any(expected) and not all(expected)


def test_the_band_threads_last_as_long_as_the_index():
    """Every lookup and add on the same threads, ended by `close`: a pool made per call gave each call new
    threads, whose malloc arenas kept what the searches freed (the filter's driver crept 30-40 MB over 160k)."""
    import threading

    def band_threads() -> set[threading.Thread]:  # the threads themselves: an ended thread's ident is reused
        return {thread for thread in threading.enumerate() if thread.name.startswith("near-duplicate-band")}

    before = band_threads()  # other tests' indexes, not closed, may still hold theirs
    index = NearDuplicateIndex(4, bands=5, threads=2)
    rng = np.random.default_rng(3)
    seen = []
    for _ in range(4):
        index.add(rng.integers(0, 2**64, 50, dtype=np.uint64))
        index.contains_near(rng.integers(0, 2**64, 50, dtype=np.uint64))
        seen.append(band_threads() - before)
    # a pool starts a second thread only when no thread is idle at a submit: one or two, and those kept
    assert 1 <= len(seen[0]) and all(earlier <= later for earlier, later in zip(seen, seen[1:]))
    assert len(seen[-1]) <= 2
    index.close()
    assert not any(thread.is_alive() for thread in seen[-1])


def test_runs_spilled_to_files_answer_as_runs_in_memory_and_leave_log_n_files(tmp_path):
    """Past `spill_entries` a run lives in files, merged file to file a few entries at a time (ties across
    the chunk bounds included); every lookup answers as the index held in memory does."""
    from dalle_pipeline.components.sorted_runs import SortedRuns

    rng = np.random.default_rng(2)
    in_memory, spilled = SortedRuns(), SortedRuns(tmp_path / "runs", spill_entries=8, merge_chunk=3)
    for _ in range(40):  # batches of 1-12 keys from a small range: many equal keys in every run
        keys = rng.integers(0, 60, int(rng.integers(1, 13))).astype(np.uint64)
        values = rng.integers(0, 2**64, len(keys), dtype=np.uint64)
        in_memory.add(keys, values)
        spilled.add(keys, values)
        queries = rng.integers(0, 70, 25).astype(np.uint64)
        expected, got = in_memory.matches(queries), spilled.matches(queries)
        assert sorted(zip(*map(np.ndarray.tolist, expected))) == sorted(zip(*map(np.ndarray.tolist, got)))
        pieces = list(spilled.matches_in_chunks(queries, chunk=4))  # a few entries at a time: the same matches
        assert all(len(owners) <= 4 or len(set(owners.tolist())) == 1 for owners, _ in pieces)
        assert sorted(pair for owners, found in pieces for pair in zip(owners.tolist(), found.tolist())) == \
            sorted(zip(*map(np.ndarray.tolist, expected)))
    files = sorted(path.name for path in (tmp_path / "runs").iterdir())
    on_disk = [path for path in spilled.runs if isinstance(path, Path)]
    assert on_disk and len(files) == 2 * len(on_disk)  # merged runs' files removed
    assert len(spilled) == len(in_memory) and len(spilled.runs) <= 10
    added = {(int(k), int(v)) for keys, values in in_memory.runs for k, v in zip(keys, values)}
    for path in on_disk:  # each file run sorted, its values following their keys
        keys, values = np.load(f"{path}.keys.npy"), np.load(f"{path}.values.npy")
        assert (keys[1:] >= keys[:-1]).all() and set(zip(keys.tolist(), values.tolist())) <= added


def test_the_band_count_suits_the_corpus_size():
    """Exact bands while the index is small; fewer, wider bands probed with their one-bit neighbours once
    the candidates sharing an exact band's value would outnumber the probes."""
    from dalle_pipeline.components.filter.dedup import choose_bands, probes_per_query

    assert choose_bands(4, 10_000) == 5 and probes_per_query(4, 5) == 5
    assert choose_bands(4, 100_000_000) == 3 and probes_per_query(4, 3) == 3 * 22 + 1  # widths 21, 21, 22
    assert choose_bands(0, 10**9) == 1
    assert all(probes_per_query(d, choose_bands(d, n)) <= 1024 for d in range(12) for n in (10**3, 10**6, 10**9))
    with pytest.raises(ValueError, match="near_duplicate_distance must be in"):
        NearDuplicateIndex(64)


def _planted_items(seed: int, count: int = 120) -> list[tuple[str, int]]:
    """(sha256, pHash) items: exact copies, near copies (1-3 bits flipped), fresh ones, in a shuffled order."""
    rng = np.random.default_rng(seed)
    base = [int(v) for v in rng.integers(0, 2**64, count, dtype=np.uint64)]

    def digest(value: int) -> str:
        return hashlib.sha256(str(value).encode()).hexdigest()

    items = []
    for value in base:
        items.append((digest(value), value))
        for _ in range(int(rng.integers(0, 3))):
            flips = rng.choice(64, int(rng.integers(1, 4)), replace=False)
            near = value
            for bit in flips:
                near ^= 1 << int(bit)
            items.append((digest(near), near))
        if rng.random() < 0.3:
            items.append((digest(value), value))
    return [items[i] for i in rng.permutation(len(items))]


def sequential_verdicts(items: list[tuple[str, int]], max_distance: int, exact: bool = True) -> list[str | None]:
    """What the filter decided item by item against every kept hash and digest."""
    kept_digests, kept_hashes, expected = set(), [], []
    for sha, phash in items:
        if exact and sha in kept_digests:
            expected.append("duplicate")
        elif any((phash ^ other).bit_count() <= max_distance for other in kept_hashes):
            expected.append("near_duplicate")
        else:
            expected.append(None)
            kept_digests.add(sha)
            kept_hashes.append(phash)
    return expected


def shard_by_shard(index, items: list[tuple[str, int]], per_shard: int = 25) -> list[str | None]:
    """The filter's path: shard by shard through `dedup.shard_verdicts` against `index`."""
    from dalle_pipeline.components.filter.dedup import shard_verdicts

    return [verdict for start in range(0, len(items), per_shard)
            for verdict in shard_verdicts(index, *map(list, zip(*items[start : start + per_shard])))]


def test_shard_verdicts_equal_a_sequential_scan_of_everything_kept_before():
    from dalle_pipeline.components.filter.dedup import KeptIndex

    items, max_distance = _planted_items(1), 2
    expected = sequential_verdicts(items, max_distance)
    index = KeptIndex(exact=True, max_distance=max_distance)
    assert shard_by_shard(index, items) == expected
    assert {"duplicate", "near_duplicate", None} == set(expected)
    assert len(index.exact) == len(index.near) == expected.count(None)


def test_a_shards_own_near_pairs_are_every_pair_within_the_distance():
    """Pairs sharing a band's value, checked by popcount, are all the pairs a full comparison finds: near
    copies, runs of identical hashes (blank images), and past 7 bits every pair compared."""
    from dalle_pipeline.components.filter.dedup import earlier_neighbours

    rng = np.random.default_rng(4)
    hashes = rng.integers(0, 2**64, 400, dtype=np.uint64)
    hashes[200:260] = hashes[3]  # a run of 60 equal hashes
    flips = np.uint64(1) << rng.integers(0, 64, (100, 3)).astype(np.uint64)
    hashes[300:400] = hashes[rng.integers(0, 300, 100)] ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]
    hashes = hashes[rng.permutation(len(hashes))]
    for max_distance in (0, 2, 4, 9):
        expected = {later: sorted(earlier for earlier in range(later)
                                  if int(hashes[later] ^ hashes[earlier]).bit_count() <= max_distance)
                    for later in range(len(hashes))}
        found = earlier_neighbours(hashes, max_distance)
        assert {later: sorted(earliers) for later, earliers in found.items()} == \
            {later: earliers for later, earliers in expected.items() if earliers}, max_distance
        assert len(found) >= 59


def test_verdicts_of_one_large_shard_equal_the_sequential_scan():
    """Large lookups (the filter groups shards) and small ones; one pHash recurring 300 times under other
    digests (a placeholder image re-encoded), its copies near others, by digest and by hash alone."""
    from dalle_pipeline.components.filter.dedup import KeptIndex

    rng = np.random.default_rng(6)
    items = _planted_items(5, 300)
    placeholder = items[0][1]
    items += [(hashlib.sha256(f"placeholder {i}".encode()).hexdigest(), placeholder ^ (1 << int(i % 3 == 0)))
              for i in range(300)]
    items = [items[i] for i in rng.permutation(len(items))]
    for max_distance, exact in ((2, True), (9, True), (2, False)):
        expected = sequential_verdicts(items, max_distance, exact)
        for per_shard in (len(items), 7):
            assert shard_by_shard(KeptIndex(exact, max_distance), items, per_shard) == expected, (max_distance, exact)
        assert expected.count("near_duplicate") >= 299


class Partitions:
    """Shares of one index answering together, as the cluster's partitions do (partitioned.py), in-process."""

    def __init__(self, partitions: int, max_distance: int, bands: int) -> None:
        from dalle_pipeline.components.filter.dedup import KeptIndex

        self.parts = [KeptIndex(True, max_distance, bands=bands, share=(part, partitions))
                      for part in range(partitions)]
        self.exact_duplicates, self.max_distance = True, max_distance

    def lookup(self, *keys):
        answers = [part.lookup(*keys) for part in self.parts]
        return tuple(np.logical_or.reduce([answer[i] for answer in answers]) for i in range(2))

    def add(self, *keys):
        for part in self.parts:
            part.add(*keys)


def test_an_index_split_by_key_answers_as_one_index_of_everything():
    """Each partition holds its share of every band table and of the digests (each entry in exactly one); their
    answers together are the whole index's, with exact bands and with wider bands probed by their neighbours."""
    items, max_distance = _planted_items(3, 200), 3
    expected = sequential_verdicts(items, max_distance)
    for bands in (4, 2):
        split = Partitions(3, max_distance, bands)
        assert shard_by_shard(split, items) == expected, bands
        kept = expected.count(None)
        assert sum(len(part.exact) for part in split.parts) == kept
        for number in range(bands):  # every kept hash in one partition's table of each band, none in two
            assert sum(len(part.near.tables[number]) for part in split.parts) == kept
        assert all(0 < len(part.exact) < kept for part in split.parts)


def test_clip_score_threshold_drops_the_worst_matches_and_records_every_score(tmp_path, monkeypatch):
    torch.manual_seed(0)
    clip_cfg = ClipConfig(model_name="filter-test-clip", embed_dim=16, vision_width=32, vision_layers=1,
                          text_width=32, text_layers=1, patch_size=8)
    register_architecture(clip_cfg, 32, tmp_path / "arch")
    clip_dir = ClipScorer.build(clip_cfg.model_name).save(tmp_path / "clip", architecture(clip_cfg, 32))
    samples = [_sample(f"0000000{i:02d}", caption=f"picture number {i}") for i in range(12)]
    _write_batch(tmp_path / "download", 0, {"00000": samples})

    loose = FilterConfig(clip_model=LOCAL_DIR + str(clip_dir), clip_min_score=-1.0)
    scores = {row["key"]: row["clip_score"] for row in read_report(run(loose, tmp_path / "download",
                                                                       tmp_path / "all").report_path).to_pylist()}
    assert all(score is not None for score in scores.values())
    threshold = float(np.median(list(scores.values())))
    result = run(loose.model_copy(update={"clip_min_score": threshold}), tmp_path / "download", tmp_path / "some")
    report = read_report(result.report_path).to_pylist()
    assert {row["key"] for row in report if row["reason"] == "low_clip_score"} == {
        key for key, score in scores.items() if score < threshold}
    assert 0 < result.dropped_by_reason["low_clip_score"] < len(samples)
    # scored as they are read, 5 at a time (the decoded images of one batch in memory): the same scores
    from dalle_pipeline.components.filter import checks

    monkeypatch.setattr(checks, "CLIP_BATCH", 5)
    batched = read_report(run(loose, tmp_path / "download", tmp_path / "batched").report_path).to_pylist()
    assert {row["key"]: row["clip_score"] for row in batched} == pytest.approx(scores, abs=1e-6)


def test_a_folder_without_finished_batches_is_an_error(tmp_path):
    (tmp_path / "empty" / ".batch-00000.partial").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished download batch"):
        run(CFG, tmp_path / "empty", tmp_path / "curated")
    assert not (tmp_path / "curated").exists()


def test_curated_shards_hold_their_samples_in_key_order_whatever_order_the_download_wrote(tmp_path):
    # img2dataset's threads write a shard as downloads finish: the same URLs come in another order
    # each run, and the trainers' batches follow the curated order
    samples = [_sample(f"00000000{index}", seed=index, caption=f"picture number {index}") for index in range(8)]
    curated = []
    for name, order in (("a", [3, 0, 7, 5, 1, 6, 2, 4]), ("b", [6, 2, 4, 0, 1, 7, 3, 5])):
        download = tmp_path / name / "download"
        _write_batch(download, 0, {"00000": [samples[index] for index in order]})
        result = run(FilterConfig(), download, tmp_path / name / "curated")
        curated.append([sample.key for sample in iter_samples(result.curated_dir)])
    assert curated[0] == curated[1] == sorted(curated[0]) and len(curated[0]) == 8
