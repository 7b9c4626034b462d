"""Byte-level BPE over captions (HF `tokenizers`): vocabulary size, lower-casing and dropout from the preset.

Byte-level means no caption is ever out of vocabulary; training is deterministic for a given
caption list, so the same corpus gives the same `tokenizer.json` (and the same hash). The stage
streams the captions from the shards (twice: training, then lengths) and never reads an image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..config import TokenizerConfig
from ..shards import iter_captions
from ..storage import StorePath, as_path, atomic_output, file_sha256

FILENAME = "tokenizer.json"
ENCODE_BATCH = 4096  # captions per `encode_batch` call when measuring lengths


def train_bpe(captions: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(captions) if isinstance(captions, Sized) else None
    tokenizer.train_from_iterator(captions, trainer=trainer, length=length)
    return tokenizer


@dataclass
class TextTokenizer:
    """A trained BPE plus the prior's text length: encode cuts, decode drops nothing."""

    tokenizer: Tokenizer
    text_len: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        return [encoding.ids[: self.text_len] for encoding in self.tokenizer.encode_batch(list(captions))]

    def with_dropout(self, dropout: float) -> TextTokenizer:
        """A copy that skips each BPE merge with probability `dropout` (segmentations vary per call).

        HF `tokenizers` draws the dropout from an unseeded RNG: a corpus tokenized with dropout
        differs from run to run, though each written Parquet then stays fixed.
        """
        copy = Tokenizer.from_str(self.tokenizer.to_str())
        copy.model.dropout = dropout or None
        return TextTokenizer(copy, self.text_len)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)).strip()

    def save(self, directory: str | Path | StorePath) -> Path | StorePath:
        """`tokenizer.json` in `directory`, written whole (a local folder, or one on an object store)."""
        path = as_path(directory) / FILENAME
        with atomic_output(path) as tmp:
            self.tokenizer.save(str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path | StorePath, text_len: int) -> TextTokenizer:
        """The tokenizer saved at `path`: a local file, or one on an object store (its URL)."""
        path = as_path(path)
        if isinstance(path, StorePath):
            return cls(Tokenizer.from_str(path.read_text()), text_len)
        return cls(Tokenizer.from_file(str(path)), text_len)


def train_and_save(cfg: TokenizerConfig, captions: Iterable[str], out_dir: str | Path | StorePath
                   ) -> tuple[Path | StorePath, str]:
    """Train on `captions` (a list or a stream read once), save `tokenizer.json`; returns its path and sha256."""
    stream = iter(captions)
    first = next(stream, None)
    if first is None:
        raise ValueError("cannot train a tokenizer on an empty caption list")
    captions = captions if isinstance(captions, Sized) else itertools.chain([first], stream)
    path = TextTokenizer(train_bpe(captions, cfg), cfg.text_len).save(out_dir)
    return path, file_sha256(path)


def caption_lengths(path: str | Path | StorePath, captions: Iterable[str], text_len: int) -> dict[str, float]:
    """The captions' lengths in the saved tokenizer's tokens, and the share of them longer than
    `text_len` (`captions_cut`: the prior sees only their first `text_len` tokens).

    Streams: captions are encoded `ENCODE_BATCH` at a time into a histogram of lengths, whose mean,
    95th percentile and maximum are exactly those numpy gives for the list of lengths."""
    tokenizer = TextTokenizer.load(path, text_len).tokenizer
    histogram = np.zeros(0, dtype=np.int64)
    for batch in _batches(captions, ENCODE_BATCH):
        lengths = np.array([len(encoding.ids) for encoding in tokenizer.encode_batch(batch)])
        counts = np.bincount(lengths, minlength=len(histogram))
        counts[: len(histogram)] += histogram
        histogram = counts
    count = int(histogram.sum())
    if not count:
        raise ValueError("no captions to measure")
    lengths_seen = np.arange(len(histogram))
    return {"caption_tokens_mean": int(histogram @ lengths_seen) / count,
            "caption_tokens_p95": _percentile(histogram, 95),
            "caption_tokens_max": float(np.flatnonzero(histogram)[-1]),
            "captions_cut": int(histogram[text_len + 1 :].sum()) / count}


def _captions(shards_dir: str | Path) -> Iterator[str]:
    """The shards' captions, read from disk on each call (no image is read, no list is kept)."""
    return (text.caption for text in iter_captions(shards_dir))


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _percentile(histogram: np.ndarray, percent: float) -> float:
    """`np.percentile(values, percent)` (its default linear method, the same float arithmetic) of the
    values a histogram counts (`histogram[v]`: how many are v), without the values."""
    count = int(histogram.sum())
    position = (count - 1) * (percent / 100)
    below = min(int(np.floor(position)), count - 1)
    above = below if position >= count - 1 else below + 1
    cumulative = np.cumsum(histogram)
    low, high = (int(np.searchsorted(cumulative, index, side="right")) for index in (below, above))
    gamma, step = position - below, high - low
    return float(high - step * (1 - gamma)) if gamma >= 0.5 else float(low + step * gamma)


@dataclass(frozen=True)
class TextTokenizerResult:
    tokenizer_path: Path | StorePath  # on an object store where the stage wrote there
    tokenizer_hash: str  # sha256 of tokenizer.json
    metrics: dict[str, float]  # the captions' `caption_lengths`

    TAGS: ClassVar = ("tokenizer_hash",)  # what a stage's run shows of its result (flows/stages.py: show_result)
    ARTIFACTS: ClassVar = ("tokenizer_path",)


def run(cfg: TokenizerConfig, curated_dir: str | Path | StorePath, out_dir: str | Path | StorePath
        ) -> TextTokenizerResult:
    """The stage's entry point: a tokenizer trained on the captions of the curated shards in `curated_dir`,
    and the captions' `caption_lengths`; says so when text_len cuts more than 1% of them."""
    path, digest = train_and_save(cfg, _captions(curated_dir), out_dir)
    lengths = caption_lengths(path, _captions(curated_dir), cfg.text_len)
    if lengths["captions_cut"] > 0.01:
        print(f"text-tokenizer: {lengths['captions_cut']:.0%} of the captions are longer than tokenizer.text_len="
              f"{cfg.text_len} tokens (95th percentile {lengths['caption_tokens_p95']:.0f}, longest "
              f"{lengths['caption_tokens_max']:.0f}): the prior sees only their first {cfg.text_len}; "
              f"--set tokenizer.text_len={int(np.ceil(lengths['caption_tokens_p95']))} keeps 95% of them whole",
              flush=True)
    return TextTokenizerResult(path, digest, lengths)
