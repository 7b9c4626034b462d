"""The evaluation set of a run: the prompts sampled and scored, and the real images they are compared with.

Built once per run and handed to the sample and evaluate stages alike. Its `stage_key` (a digest
of everything in it) is what the stage cache keys both stages by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from ..config import CorpusConfig
from ..corpus.shapes import ShapeSpec, eval_set

MIN_REFERENCES = 256


@dataclass(frozen=True)
class EvaluationSet:
    prompts: list[str]  # sampled and evaluated, in this order
    references: np.ndarray  # held-out real images (N, H, W, 3) uint8, for FID and fd_clip
    specs: list[list[ShapeSpec]] | None = None  # the shapes behind each prompt (the shapes corpus: the oracle)
    holdout: list[bool] | None = None  # per prompt: a zero-shot pair, never in a training caption

    def stage_key(self) -> str:
        digest = hashlib.sha256(json.dumps({
            "prompts": self.prompts, "holdout": self.holdout,
            "specs": [[asdict(spec) for spec in specs] for specs in self.specs] if self.specs is not None else None,
        }, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.references).tobytes())
        return digest.hexdigest()


def shapes_evaluation_set(corpus: CorpusConfig, num_prompts: int, seed: int) -> EvaluationSet:
    """Held-out shapes captions, then half as many zero-shot holdout pairs, and max(256, num_prompts)
    reference scenes from another seed."""
    items = eval_set(corpus, num_prompts, seed=seed)
    holdout_items = eval_set(corpus, max(1, num_prompts // 2), seed=seed, holdout_only=True)
    references = eval_set(corpus, max(MIN_REFERENCES, num_prompts), seed=seed + 1)
    return EvaluationSet(prompts=[item.caption for item in items + holdout_items],
                         references=np.stack([np.asarray(item.image) for item in references]),
                         specs=[item.specs for item in items + holdout_items],
                         holdout=[False] * len(items) + [True] * len(holdout_items))
