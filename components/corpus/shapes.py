"""The shapes vocabulary: coloured circles, squares and triangles on a 3x3 grid, and their captions.

The corpus exists so the whole pipeline can be checked on a laptop: a model that learned it
must draw what a caption names, and `oracle.py` can tell whether it did. That is why every
attribute is chosen to be recoverable from a 32 px image: eight colours far apart in RGB,
three shapes with distinct fill ratios, two sizes whose areas differ by ~2.7x, and positions
whose cells never let two shapes touch (two shapes are only placed where their bounding boxes
keep a gap, see `_fits_beside`).

Geometry is in fractions of the image side so the same spec renders at any `image_size`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..config import CorpusConfig
from ..storage import atomic_path

BACKGROUND: tuple[int, int, int] = (16, 16, 16)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Half-extent of a shape's bounding box as a fraction of the image side. Kept below the
# distance from an edge cell's centre to the border (0.22), so no shape is ever cut off.
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}

# Cell centres (x, y) as fractions of the image side, in reading order.
_GRID = (0.22, 0.5, 0.78)
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_GRID[0], _GRID[0]),
    "top": (_GRID[1], _GRID[0]),
    "top right": (_GRID[2], _GRID[0]),
    "left": (_GRID[0], _GRID[1]),
    "center": (_GRID[1], _GRID[1]),
    "right": (_GRID[2], _GRID[1]),
    "bottom left": (_GRID[0], _GRID[2]),
    "bottom": (_GRID[1], _GRID[2]),
    "bottom right": (_GRID[2], _GRID[2]),
}

# Gap kept between the bounding boxes of two shapes, as a fraction of the side (~2 px at 32 px),
# so they stay separate connected components for the oracle.
MIN_GAP = 0.05

_POSITION_PHRASES: dict[str, str] = {
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene, named by its four captioned attributes."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def position_phrase(position: str) -> str:
    """Edges read 'at the top'/'on the left', corners 'in the top left', the middle 'in the center'."""
    return _POSITION_PHRASES.get(position, f"in the {position}")


def caption(specs: Iterable[ShapeSpec]) -> str:
    """'a small red circle in the top left and a large blue square on the right'."""
    phrases = [f"a {s.size} {s.colour} {s.shape} {position_phrase(s.position)}" for s in specs]
    if not phrases:
        raise ValueError("a caption needs at least one shape")
    return " and ".join(phrases)


def _fits_beside(a: ShapeSpec, b: ShapeSpec) -> bool:
    """True when the bounding boxes of `a` and `b` are at least MIN_GAP apart on some axis."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    reach = SIZES[a.size] + SIZES[b.size] + MIN_GAP
    return abs(ax - bx) >= reach or abs(ay - by) >= reach


def _reading_order(spec: ShapeSpec) -> int:
    return list(POSITIONS).index(spec.position)


def validate_zero_shot_pairs(zero_shot_pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The zero-shot pairs as a set of (colour, shape), refusing names outside the vocabulary."""
    pairs = {(colour, shape) for colour, shape in zero_shot_pairs}
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"zero-shot pair ({colour!r}, {shape!r}) is not in the vocabulary: "
                f"colours {list(COLOURS)}, shapes {list(SHAPES)}"
            )
    if len(pairs) == len(COLOURS) * len(SHAPES):
        raise ValueError("the zero-shot pairs cover every colour-shape pair; nothing is left to train on")
    return pairs


def allowed_pairs(zero_shot_pairs: Collection[tuple[str, str]], zero_shot: bool = False) -> list[tuple[str, str]]:
    """Colour-shape pairs a scene may use: all but the zero-shot pairs for training, only them for zero-shot."""
    unseen = validate_zero_shot_pairs(zero_shot_pairs)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in unseen) == zero_shot]
    if not pairs:
        raise ValueError("zero_shot=True needs at least one zero-shot pair")
    return pairs


def sample_specs(
    rng: np.random.Generator,
    max_shapes: int,
    zero_shot_pairs: Collection[tuple[str, str]] = (),
    zero_shot: bool = False,
) -> list[ShapeSpec]:
    """Draw a scene of 1..max_shapes shapes that fit together, in reading order.

    Training scenes (`zero_shot=False`) never use a zero-shot colour-shape pair; zero-shot
    scenes (`zero_shot=True`) use nothing else. Shapes that do not fit beside those already
    placed are skipped, so a scene may hold fewer shapes than drawn (a large centre shape fills
    the grid on its own).
    """
    pairs = allowed_pairs(zero_shot_pairs, zero_shot)
    count = int(rng.integers(1, max_shapes + 1))
    positions = list(POSITIONS)
    order = rng.permutation(len(positions))
    scene: list[ShapeSpec] = []
    for index in order:
        if len(scene) == count:
            break
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        spec = ShapeSpec(colour, shape, size, positions[int(index)])
        if all(_fits_beside(spec, other) for other in scene):
            scene.append(spec)
    return sorted(scene, key=_reading_order)


def outline(spec: ShapeSpec, image_size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the shape in pixels, both end pixels drawn."""
    cx, cy = POSITIONS[spec.position]
    half = SIZES[spec.size]
    # -1 on the far edge: PIL draws both end pixels, so the shape spans exactly 2*half*side pixels
    return (
        (cx - half) * image_size,
        (cy - half) * image_size,
        (cx + half) * image_size - 1,
        (cy + half) * image_size - 1,
    )


def completable_below(specs: Sequence[ShapeSpec], image_size: int, boundary: int) -> bool:
    """Whether image-to-image given the pixel rows above `boundary` has a shape to finish: every shape
    starts above it (the given rows show them all) and one continues below it."""
    return (all(outline(spec, image_size)[1] < boundary for spec in specs)
            and any(outline(spec, image_size)[3] >= boundary for spec in specs))


def render(specs: Iterable[ShapeSpec], image_size: int) -> Image.Image:
    """Draw the scene without antialiasing: every pixel is the background or a palette colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for spec in specs:
        left, top, right, bottom = outline(spec, image_size)
        fill = COLOURS[spec.colour]
        if spec.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif spec.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # triangle: apex at the top centre, base along the bottom edge
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


# Separate random streams for the training corpus and evaluation sets, so that an eval seed equal
# to the corpus seed still draws different scenes.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
URL_LIST_NAME = "urls.parquet"
IMAGES_DIR_NAME = "images"


@dataclass(frozen=True)
class CorpusResult:
    """Where `generate` put the corpus: the URL list is what the download stage reads."""

    url_list: Path
    images_dir: Path
    num_images: int

    @property
    def metrics(self) -> dict[str, float]:
        return {"num_images": self.num_images}


@dataclass(frozen=True)
class EvalItem:
    """A scene for evaluation: prompt the model with `caption`, score its output against `specs`."""

    caption: str
    specs: list[ShapeSpec]
    image: Image.Image


def _scenes(cfg: CorpusConfig, count: int, seed: int, stream: int, zero_shot: bool) -> list[list[ShapeSpec]]:
    rng = np.random.default_rng([seed, stream])
    return [sample_specs(rng, cfg.max_shapes, cfg.zero_shot_pairs, zero_shot) for _ in range(count)]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def run(cfg: CorpusConfig, out_dir: str | Path) -> CorpusResult:
    """Write `cfg.num_images` PNGs and a URL list of them with `file://` URLs, deterministically.

    The demo downloads these through img2dataset like any real URL list. Both the images folder
    and `urls.parquet` are replaced atomically, the URL list last, so a URL list on disk always
    points at a complete set of images; the same cfg and out_dir give byte-identical files.
    """
    out_dir = Path(out_dir).resolve()
    images_dir = out_dir / IMAGES_DIR_NAME
    scenes = _scenes(cfg, cfg.num_images, cfg.seed, _TRAIN_STREAM, zero_shot=False)
    names = [f"{index:06d}.png" for index in range(len(scenes))]
    with atomic_path(images_dir) as staging:
        staging.mkdir()
        for name, specs in zip(names, scenes):
            (staging / name).write_bytes(_png_bytes(render(specs, cfg.image_size)))
    table = pa.table(
        {
            "url": [(images_dir / name).as_uri() for name in names],
            "caption": [caption(specs) for specs in scenes],
            "objects": [json.dumps([spec.as_dict() for spec in specs]) for specs in scenes],
        }
    )
    url_list = out_dir / URL_LIST_NAME
    with atomic_path(url_list) as staging:
        pq.write_table(table, staging, compression="zstd")
    return CorpusResult(url_list=url_list, images_dir=images_dir, num_images=len(scenes))


def eval_set(cfg: CorpusConfig, n: int, seed: int, zero_shot: bool = False) -> list[EvalItem]:
    """`n` scenes drawn apart from the training stream; `zero_shot` gives scenes of the zero-shot pairs.

    The vocabulary is small, so an ordinary eval scene may also occur in training; only the
    zero-shot pairs are guaranteed unseen.
    """
    scenes = _scenes(cfg, n, seed, _EVAL_STREAM, zero_shot)
    return [EvalItem(caption(specs), specs, render(specs, cfg.image_size)) for specs in scenes]


def specs_from_json(objects: str) -> list[ShapeSpec]:
    """The `objects` column of the URL list (and of the shards' json) back into specs."""
    return [ShapeSpec(**item) for item in json.loads(objects)]
