"""Byte-level BPE over captions (HF `tokenizers`): vocabulary size, lower-casing and dropout from the preset.

Byte-level means no caption is ever out of vocabulary; training is deterministic for a given
caption list, so the same corpus gives the same `tokenizer.json` (and the same hash).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..config import TokenizerConfig
from ..shards import iter_samples
from ..storage import atomic_path, file_sha256

FILENAME = "tokenizer.json"


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
    tokenizer.train_from_iterator(captions, trainer=trainer)
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

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path, text_len: int) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), text_len)


def train_and_save(cfg: TokenizerConfig, captions: Sequence[str], out_dir: str | Path) -> tuple[Path, str]:
    """Train on `captions`, save `tokenizer.json`; returns its path and sha256."""
    if not captions:
        raise ValueError("cannot train a tokenizer on an empty caption list")
    path = TextTokenizer(train_bpe(captions, cfg), cfg.text_len).save(out_dir)
    return path, file_sha256(path)


def caption_lengths(path: str | Path, captions: Sequence[str], text_len: int) -> dict[str, float]:
    """The captions' lengths in the saved tokenizer's tokens, and the share of them longer than
    `text_len` (`captions_cut`: the prior sees only their first `text_len` tokens)."""
    lengths = np.array([len(encoding.ids) for encoding in Tokenizer.from_file(str(path)).encode_batch(list(captions))])
    return {"caption_tokens_mean": float(lengths.mean()), "caption_tokens_p95": float(np.percentile(lengths, 95)),
            "caption_tokens_max": float(lengths.max()), "captions_cut": float((lengths > text_len).mean())}


@dataclass(frozen=True)
class TextTokenizerResult:
    tokenizer_path: Path
    tokenizer_hash: str  # sha256 of tokenizer.json
    metrics: dict[str, float]  # the captions' `caption_lengths`

    TAGS: ClassVar = ("tokenizer_hash",)  # what a stage's run shows of its result (flows/stages.py: show_result)
    ARTIFACTS: ClassVar = ("tokenizer_path",)


def run(cfg: TokenizerConfig, curated_dir: str | Path, out_dir: str | Path) -> TextTokenizerResult:
    """The stage's entry point: a tokenizer trained on the captions of the curated shards in `curated_dir`,
    and the captions' `caption_lengths`; says so when text_len cuts more than 1% of them."""
    captions = [sample.caption for sample in iter_samples(curated_dir)]
    path, digest = train_and_save(cfg, captions, out_dir)
    lengths = caption_lengths(path, captions, cfg.text_len)
    if lengths["captions_cut"] > 0.01:
        print(f"text-tokenizer: {lengths['captions_cut']:.0%} of the captions are longer than tokenizer.text_len="
              f"{cfg.text_len} tokens (95th percentile {lengths['caption_tokens_p95']:.0f}, longest "
              f"{lengths['caption_tokens_max']:.0f}): the prior sees only their first {cfg.text_len}; "
              f"--set tokenizer.text_len={int(np.ceil(lengths['caption_tokens_p95']))} keeps 95% of them whole",
              flush=True)
    return TextTokenizerResult(path, digest, lengths)
