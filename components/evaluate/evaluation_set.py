"""The evaluation set of a run: the prompts sampled and scored, and the real images they are compared with.

Built once per run and handed to the sample and evaluate stages alike. Its `stage_key` (a digest
of everything in it) is what the stage cache keys both stages by. The shapes corpus draws its set
apart from the training stream (`shapes_evaluation_set`, with the shapes behind each prompt for
the oracle); your corpus is judged on its held-out samples (`holdout_evaluation_set`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import CorpusConfig
from ..corpus.shapes import ShapeSpec, eval_set
from ..shards import HOLDOUT_DIR, SampleText, fitted_pixels, holdout_rank, read_captions, read_images, shard_paths

MIN_REFERENCES = 256


def retrieval_pool_of(prompts: Sequence[str], captions: Sequence[str] | None = None) -> list[str]:
    """The distinct captions a sample's own prompt is ranked among: `captions`, then every prompt not among them."""
    return list(dict.fromkeys([*(captions or []), *prompts]))


@dataclass(frozen=True)
class EvaluationSet:
    prompts: list[str]  # sampled and evaluated, in this order
    references: np.ndarray  # held-out real images (N, H, W, 3) uint8, for FID and fd_clip
    specs: list[list[ShapeSpec]] | None = None  # the shapes behind each prompt (the shapes corpus: the oracle)
    zero_shot: list[bool] | None = None  # per prompt: a zero-shot pair, never in a training caption
    captions: list[str] | None = None  # caption retrieval ranks each sample's prompt among these (None: the prompts)
    ids: list[str] | None = None  # the held-out items behind the references, in order (your corpus)
    scenes: np.ndarray | None = None  # (P, H, W, 3) the scene each prompt was drawn from (shapes: image-to-image)

    @property
    def retrieval_pool(self) -> list[str]:
        return retrieval_pool_of(self.prompts, self.captions)

    def stage_key(self) -> str:
        digest = hashlib.sha256(json.dumps({
            "prompts": self.prompts, "zero_shot": self.zero_shot, "captions": self.captions, "ids": self.ids,
            "specs": [[asdict(spec) for spec in specs] for specs in self.specs] if self.specs is not None else None,
        }, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.references).tobytes())
        if self.scenes is not None:
            digest.update(np.ascontiguousarray(self.scenes).tobytes())
        return digest.hexdigest()


def shapes_evaluation_set(corpus: CorpusConfig, num_prompts: int, seed: int) -> EvaluationSet:
    """Held-out shapes captions, then half as many of the zero-shot pairs, and max(256, num_prompts)
    reference scenes from another seed."""
    items = eval_set(corpus, num_prompts, seed=seed)
    zero_shot_items = eval_set(corpus, max(1, num_prompts // 2), seed=seed, zero_shot=True)
    references = eval_set(corpus, max(MIN_REFERENCES, num_prompts), seed=seed + 1)
    return EvaluationSet(prompts=[item.caption for item in items + zero_shot_items],
                         references=np.stack([np.asarray(item.image) for item in references]),
                         specs=[item.specs for item in items + zero_shot_items],
                         zero_shot=[False] * len(items) + [True] * len(zero_shot_items),
                         scenes=np.stack([np.asarray(item.image) for item in items + zero_shot_items]))


def holdout_evaluation_set(curated_dir: str | Path, image_size: int, num_prompts: int, max_references: int,
                           prompts_file: str | Path | None = None, ids: list[str] | None = None) -> EvaluationSet:
    """Your corpus's held-out samples (the filter's `holdout/`): the `max_references` of lowest hash as
    references, the captions of the first `num_prompts` as prompts (or the lines of `prompts_file`), all
    their captions as the retrieval pool. `ids` (a champion's set) picks those items instead, as far as
    the corpus still holds them, so a retrain is judged on the champion's set.

    Two passes over the shards: captions and ids only (keeping just the chosen items), then the images of
    the chosen items alone, so memory holds the set, never the held-out corpus."""
    holdout = Path(curated_dir) / HOLDOUT_DIR
    chosen = _chosen_by_id(holdout, ids) if ids is not None else _lowest_ranked(holdout, max_references)
    order = [item for item in ids if item in chosen] if ids is not None else list(chosen)
    if len(order) < 2:
        raise ValueError(f"{len(order)} held-out samples in {holdout}: evaluation needs at least 2; raise "
                         "data.holdout_fraction (or bring more data)")
    captions = [chosen[item][1].caption for item in order]
    if prompts_file is not None:
        lines = Path(prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"sample.prompts_file {prompts_file} holds no prompts")
    else:
        prompts = captions[:num_prompts]
    images = _fitted_images(chosen, image_size)
    references = np.stack([images[item] for item in order])
    return EvaluationSet(prompts=prompts, references=references, captions=prompts if prompts_file else captions,
                         ids=order)


_Found = tuple[Path, SampleText]  # the shard an item's (last) sample is in, and its text


def _held_out(holdout: Path) -> Iterator[tuple[str, Path, SampleText]]:
    """(id, shard, text) of each held-out sample in file order; the id is the meta's url, else the key."""
    for path in shard_paths(holdout):
        for text in read_captions(path):
            yield text.meta.get("url") or text.key, path, text


def _chosen_by_id(holdout: Path, ids: list[str]) -> dict[str, _Found]:
    wanted, chosen = set(ids), {}
    for item, path, text in _held_out(holdout):
        if item in wanted:
            chosen[item] = (path, text)  # a later sample of the same id replaces the earlier one
    return chosen


def _lowest_ranked(holdout: Path, count: int) -> dict[str, _Found]:
    """The `count` items of lowest `holdout_rank` (ties: the first seen), in that order, from a bounded heap."""
    worst_first: list[tuple[float, int, str]] = []  # (-rank, -first seen): the worst kept item on top
    chosen: dict[str, _Found] = {}
    for seen, (item, path, text) in enumerate(_held_out(holdout)):
        if item in chosen:
            chosen[item] = (path, text)
            continue
        entry = (-holdout_rank(item), -seen, item)
        if len(worst_first) < count:
            heapq.heappush(worst_first, entry)
        elif count > 0 and entry > worst_first[0]:
            del chosen[heapq.heapreplace(worst_first, entry)[2]]
        else:
            continue
        chosen[item] = (path, text)
    return {item: chosen[item] for _, _, item in sorted(worst_first, reverse=True)}


def _fitted_images(chosen: dict[str, _Found], size: int) -> dict[str, np.ndarray]:
    """The chosen items' images fitted to `size`, reading from each shard only their image members."""
    by_shard: dict[Path, dict[str, str]] = {}
    for item, (path, text) in chosen.items():
        by_shard.setdefault(path, {})[text.key] = item
    images = {}
    for path, items in by_shard.items():
        texts = [text for _, text in (chosen[item] for item in items.values())]
        for key, data in read_images(path, texts).items():
            images[items[key]] = fitted_pixels(data, size)
    return images
