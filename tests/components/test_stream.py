import itertools
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dalle_pipeline.components.token_parquet import MANIFEST, TokenParquet, read, schema, to_tensors
from dalle_pipeline.components.training.stream import ParquetBatches

TEXT_LEN, GRID = 6, 4
PART_ROWS = (37, 50, 23)  # 110 rows in row groups of 8: uneven groups, a short last group per part


def write_tokens(directory, part_rows=PART_ROWS, row_group_size=8):
    """A token dataset whose image token 0 is each row's global index, captions of 0..TEXT_LEN+2 tokens."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    parts, first = [], 0
    for number, rows in enumerate(part_rows):
        index = np.arange(first, first + rows)
        texts = [rng.integers(1, 1000, rng.integers(0, TEXT_LEN + 3)).tolist() for _ in index]
        image = rng.integers(0, 256, (rows, GRID * GRID), dtype=np.uint16)
        image[:, 0] = index
        table = pa.table(
            {
                "key": pa.array([f"k{i}" for i in index], pa.string()),
                "caption": pa.array([f"caption {i}" for i in index], pa.string()),
                "text_tokens": pa.array(texts, pa.list_(pa.uint16())),
                "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1), pa.uint16()), GRID * GRID),
            },
            schema=schema(GRID),
        )
        name = f"{number:05d}.parquet"
        pq.write_table(table, directory / name, row_group_size=row_group_size)
        parts.append({"file": name, "rows": rows})
        first += rows
    manifest = {"rows": first, "parts": parts, "text_len": TEXT_LEN, "grid_size": str(GRID)}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens"))


def rows_of(batch):
    return batch[2][:, 0].tolist()


def epoch_rows(batches, epoch):
    """Global row indices of every batch of `epoch`, one list per batch."""
    steps = batches.steps_per_epoch
    return [rows_of(b) for b in itertools.islice(batches.from_step(epoch * steps), steps)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_row_once_per_epoch_across_ranks(dataset, world_size):
    ranks = [ParquetBatches(dataset, 4, seed=3, rank=rank, world_size=world_size, buffer_rows=16)
             for rank in range(world_size)]
    steps = 110 // world_size // 4
    assert all(batches.steps_per_epoch == steps for batches in ranks)
    for epoch in range(3):
        seen = [sum(epoch_rows(batches, epoch), []) for batches in ranks]
        assert all(len(rows) == len(set(rows)) == steps * 4 for rows in seen)  # no row twice on a rank
        assert len(set().union(*seen)) == world_size * steps * 4  # ranks disjoint
        # left out: 110 % world_size rows from the split, then each share's tail of 110 // world_size % 4
        assert 110 - world_size * steps * 4 == 110 % world_size + world_size * (110 // world_size % 4)


def test_all_ranks_take_the_same_number_of_steps(dataset):
    ranks = [ParquetBatches(dataset, 5, seed=0, rank=rank, world_size=3, buffer_rows=7) for rank in range(3)]
    for batches in ranks:
        assert batches.steps_per_epoch == 110 // 3 // 5
        iterator = iter(batches)
        for epoch in range(2):  # a whole epoch, then the next epoch's first batch: never a short batch
            for _ in range(batches.steps_per_epoch + 1 if epoch else batches.steps_per_epoch):
                text, lengths, image = next(iterator)
                assert text.shape == (5, TEXT_LEN) and lengths.shape == (5,) and image.shape == (5, GRID * GRID)


def test_batches_equal_the_in_memory_tensors(dataset):
    text, lengths, image = to_tensors(read(dataset)[0], TEXT_LEN)
    assert (lengths == 0).any() and (lengths == TEXT_LEN).any()  # empty and truncated captions are covered
    batches = ParquetBatches(dataset, 8, seed=1, buffer_rows=20)
    for batch in itertools.islice(batches, 2 * batches.steps_per_epoch):
        assert all(t.dtype == torch.int64 for t in batch)
        rows = batch[2][:, 0]
        assert torch.equal(batch[0], text[rows]) and torch.equal(batch[1], lengths[rows])
        assert torch.equal(batch[2], image[rows])


def test_order_is_deterministic_per_seed_and_epoch(dataset):
    def first_epochs(seed):
        return [epoch_rows(ParquetBatches(dataset, 4, seed=seed, rank=1, world_size=2, buffer_rows=16), e)
                for e in range(2)]

    same, other_seed = first_epochs(7), first_epochs(8)
    assert same == first_epochs(7)
    assert same != other_seed
    assert same[0] != same[1]  # a new epoch, a new order
    assert sorted(sum(same[0], [])) != sorted(sum(same[1], []))  # and a new split between the ranks


def test_the_buffer_mixes_row_groups(dataset):
    # a buffer of several row groups draws rows of different groups into one batch
    batch = next(iter(ParquetBatches(dataset, 8, seed=0, buffer_rows=32)))
    assert len({row // 8 for row in rows_of(batch)}) > 2


@pytest.mark.parametrize("buffer_rows", [0, 16, 1000])
def test_resume_yields_the_same_batches(dataset, buffer_rows):
    kwargs = dict(per_rank_batch=3, seed=5, rank=1, world_size=2, buffer_rows=buffer_rows, exclude_rows=[0, 9, 40, 41])
    fresh = ParquetBatches(dataset, **kwargs)
    steps = fresh.steps_per_epoch
    expected = list(itertools.islice(iter(fresh), 2 * steps + 3))
    for step in (1, 7, steps - 1, steps, steps + 4, 2 * steps + 1):
        resumed = list(itertools.islice(ParquetBatches(dataset, **kwargs).from_step(step), 2 * steps + 3 - step))
        assert len(resumed) == len(expected[step:])
        for got, want in zip(resumed, expected[step:]):  # across the epoch boundary too
            assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_excluded_rows_are_never_yielded_and_read_back(dataset):
    held_out = torch.tensor([3, 17, 36, 37, 64, 109])
    batches = ParquetBatches(dataset, 4, seed=2, buffer_rows=16, exclude_rows=held_out)
    assert batches.num_rows == 104 and batches.steps_per_epoch == 26
    seen = set(sum(epoch_rows(batches, 0), []) + sum(epoch_rows(batches, 1), []))
    assert not seen & set(held_out.tolist())
    assert len(set(sum(epoch_rows(batches, 0), []))) == 104

    text, lengths, image = to_tensors(read(dataset)[0], TEXT_LEN)
    rows = held_out.flip(0)  # read in the order given
    got = TokenParquet(dataset).read_rows(rows)
    assert all(torch.equal(g, w[rows]) for g, w in zip(got, (text, lengths, image)))
    assert ParquetBatches(dataset, 4, seed=2, exclude_rows=set(held_out.tolist())).num_rows == 104


def test_clear_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="110 rows .* cannot fill one batch of 30 x 4 ranks"):
        ParquetBatches(dataset, 30, seed=0, world_size=4)
    with pytest.raises(ValueError, match=r"100 rows .*10 excluded\) cannot fill one batch of 51 x 2"):
        ParquetBatches(dataset, 51, seed=0, world_size=2, exclude_rows=range(10))
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 110\)"):
        ParquetBatches(dataset, 4, seed=0, exclude_rows=[110])
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        ParquetBatches(dataset, 4, seed=0, rank=2, world_size=2)

    missing = write_tokens(tmp_path / "missing", part_rows=(10, 10))
    (missing / "00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="00001.parquet is listed in _manifest.json but missing"):
        ParquetBatches(missing, 4, seed=0)

    disagreeing = write_tokens(tmp_path / "disagreeing", part_rows=(10, 10))
    manifest = json.loads((disagreeing / MANIFEST).read_text())
    manifest["parts"][1]["rows"] = 12
    (disagreeing / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="00001.parquet has 10 rows, _manifest.json says 12"):
        ParquetBatches(disagreeing, 4, seed=0)

    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        ParquetBatches(tmp_path, 4, seed=0)


def test_image_shards_stream_the_corpus_images_and_captions_and_resume_at_any_step(curated_shards):
    """The dVAE's and CLIP's stream: every image of an epoch once per rank share, the pixels (and caption
    tokens) those of the in-memory corpus, and a resumed stream yields what the unbroken one did."""
    from dalle_pipeline.components.shards import load_corpus
    from dalle_pipeline.components.training.image_shards import ImageShards, streams
    from dalle_pipeline.components.training.stream import StreamedBatches

    corpus = load_corpus(curated_shards, 32)
    tokenize = lambda captions: np.array([[len(c), ord(c[0]) if c else 0] for c in captions])  # noqa: E731
    shards = ImageShards(curated_shards, 32, tokenize=tokenize)
    assert (shards.num_rows, shards.max_group_rows, shards.decoded_bytes) == (96, 64, 96 * 32 * 32 * 3)
    assert streams("auto", shards) is False and streams("stream", shards) and not streams("memory", shards)
    every_row = Counter((corpus.images[row].tobytes(), tuple(tokenize([corpus.captions[row]])[0]))
                        for row in range(len(corpus)))
    kwargs = dict(per_rank_batch=4, seed=1, world_size=2, buffer_rows=16)
    seen = Counter()
    for rank in range(2):
        batches = StreamedBatches(shards, rank=rank, **kwargs)
        for pixels, tokens in itertools.islice(iter(batches), batches.steps_per_epoch):
            assert pixels.dtype == torch.uint8 and pixels.shape == (4, 32, 32, 3)
            seen.update((image.numpy().tobytes(), tuple(row)) for image, row in zip(pixels, tokens.tolist()))
    assert seen == every_row  # 48 rows a rank, 12 steps of 4: each (image, caption) once, nothing left out
    expected = list(itertools.islice(iter(StreamedBatches(shards, rank=1, **kwargs)), 30))
    for step in (5, 12, 17):
        resumed = list(itertools.islice(StreamedBatches(shards, rank=1, **kwargs).from_step(step), 30 - step))
        for got, want in zip(resumed, expected[step:]):
            assert all(torch.equal(g, w) for g, w in zip(got, want))
