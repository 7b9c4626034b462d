"""The embedded shapes corpus: a seeded generator of captioned images and an oracle that grades them.

It lets the whole pipeline run on a laptop with no network, and gives evaluation a ground truth:
`oracle.score` says whether an image shows the colour, shape, size and position its caption names.
"""

from .oracle import ATTRIBUTES, DetectedObject, mean_scores, read_image, score
from .shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    CorpusResult,
    EvalItem,
    ShapeSpec,
    caption,
    eval_set,
    render,
    sample_specs,
    specs_from_json,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "CorpusResult",
    "DetectedObject",
    "EvalItem",
    "ShapeSpec",
    "caption",
    "eval_set",
    "mean_scores",
    "read_image",
    "render",
    "sample_specs",
    "score",
    "specs_from_json",
]
