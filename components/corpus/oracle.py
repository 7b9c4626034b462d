"""Read a shapes image back into specs, and score an image against the specs its caption names.

This is the evaluation's ground truth for generated images, so it has to tolerate what a
generative model draws: blurred edges, off-palette colours, speckle. Three choices make it so:
objects are the *largest* connected components (speckle loses), each component's edge is
re-cut halfway between the background and its own median colour (blur neither grows nor
shrinks a shape), and every attribute is a nearest-prototype decision, never an exact match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .shapes import BACKGROUND, COLOURS, POSITIONS, SIZES, ShapeSpec

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

# A pixel is foreground when this far (RGB Euclidean) from the background; every palette
# colour is > 150 away, JPEG/model noise on the background stays well below.
FOREGROUND_DISTANCE = 60.0
# Least share of its palette colour a blurred shape still shows (see `_palette_colour`).
MIN_MIX = 0.5
# Components smaller than this share of the smallest drawable shape are speckle.
MIN_AREA_SHARE = 0.3

# Shape prototypes in (fill ratio of the bounding box, share of the mass in the top half):
# a triangle standing on its base is half-empty and bottom-heavy.
_SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, 0.5),
    "square": (1.0, 0.5),
    "triangle": (0.5, 0.25),
}
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64)
_POSITION_NAMES = list(POSITIONS)
_CELL_CENTRES = np.array([POSITIONS[name] for name in _POSITION_NAMES], dtype=np.float64)
# Sizes are told apart at the geometric mean of their half-extents.
_SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))


@dataclass(frozen=True)
class DetectedObject:
    """A shape read from an image: its attributes plus the measurements that decided them."""

    colour: str
    shape: str
    size: str
    position: str
    centroid: tuple[float, float]  # (x, y) as fractions of the image side
    area: float  # share of the image covered
    fill_ratio: float

    def as_spec(self) -> ShapeSpec:
        return ShapeSpec(self.colour, self.shape, self.size, self.position)


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {pixels.shape}")
    return pixels


def _min_area_px(height: int, width: int) -> float:
    smallest = min(SIZES.values()) * 2
    return MIN_AREA_SHARE * _SHAPE_PROTOTYPES["triangle"][0] * smallest**2 * height * width


def _nearest(names: list[str], prototypes: np.ndarray, value: np.ndarray) -> str:
    return names[int(np.argmin(((prototypes - value) ** 2).sum(axis=1)))]


def _palette_colour(rgb: np.ndarray) -> str:
    """Nearest palette colour allowing for dimming: blur mixes a shape's colour with the background.

    Each palette colour p may appear as bg + a * (p - bg) with a in [MIN_MIX, 1]; the colour whose
    best such mix lies closest to `rgb` wins.
    """
    offsets = _PALETTE - np.array(BACKGROUND)
    observed = rgb - np.array(BACKGROUND)
    mix = np.clip((offsets @ observed) / (offsets**2).sum(axis=1), MIN_MIX, 1.0)
    residual = ((observed[None, :] - mix[:, None] * offsets) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(np.argmin(residual))]


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape by nearest prototype in (fill ratio, top-half mass); returns it and the fill ratio."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(height * width)
    middle = (ys.min() + ys.max()) / 2.0
    top_share = (np.count_nonzero(ys < middle) + 0.5 * np.count_nonzero(ys == middle)) / len(ys)
    names = list(_SHAPE_PROTOTYPES)
    prototypes = np.array([_SHAPE_PROTOTYPES[name] for name in names])
    return _nearest(names, prototypes, np.array([fill, top_share])), fill


def _recut(region: np.ndarray, pixels: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut the region's edge halfway to its median colour and keep the largest piece.

    Returns the refined mask and the median colour it was cut at.
    """
    colour = np.median(pixels[region], axis=0)
    threshold = 0.5 * float(np.linalg.norm(colour - np.array(BACKGROUND)))
    refined = region & (distance > max(threshold, FOREGROUND_DISTANCE / 2))
    labels, count = ndimage.label(refined)
    if count > 1:
        sizes = ndimage.sum_labels(refined, labels, index=range(1, count + 1))
        refined = labels == (int(np.argmax(sizes)) + 1)
    if refined.any():  # the core's colour, not the fringe's
        colour = np.median(pixels[refined], axis=0)
    return refined, colour


def _describe(mask: np.ndarray, colour: np.ndarray) -> DetectedObject:
    height, width = mask.shape
    shape, fill = _classify_shape(mask)
    area = np.count_nonzero(mask) / float(height * width)
    half_extent = np.sqrt(area / _SHAPE_PROTOTYPES[shape][0]) / 2
    ys, xs = np.nonzero(mask)
    centroid = ((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height)
    return DetectedObject(
        colour=_palette_colour(colour),
        shape=shape,
        size="small" if half_extent < _SIZE_THRESHOLD else "large",
        position=_nearest(_POSITION_NAMES, _CELL_CENTRES, np.array(centroid)),
        centroid=(float(centroid[0]), float(centroid[1])),
        area=float(area),
        fill_ratio=float(fill),
    )


def read_image(image: Image.Image | np.ndarray, max_objects: int | None = None) -> list[DetectedObject]:
    """Objects drawn in `image` (PIL or HxWx3 uint8), largest first; speckle is ignored.

    Geometry is measured in fractions of the side, so any image size works.
    """
    pixels = _as_pixels(image)
    distance = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float64), axis=2)
    labels, count = ndimage.label(distance > FOREGROUND_DISTANCE)
    if count == 0:
        return []
    areas = ndimage.sum_labels(np.ones_like(distance), labels, index=range(1, count + 1))
    min_area = _min_area_px(*distance.shape)
    objects: list[DetectedObject] = []
    for index in np.argsort(-areas, kind="stable"):
        if areas[index] < min_area or (max_objects is not None and len(objects) == max_objects):
            break
        refined, colour = _recut(labels == index + 1, pixels, distance)
        if np.count_nonzero(refined) >= min_area:
            objects.append(_describe(refined, colour))
    return objects


def _match(specs: list[ShapeSpec], objects: list[DetectedObject]) -> dict[int, DetectedObject]:
    """Pair each spec with a distinct object, minimising the total distance to described positions."""
    if not specs or not objects:
        return {}
    targets = np.array([POSITIONS[spec.position] for spec in specs])
    found = np.array([obj.centroid for obj in objects])
    cost = np.linalg.norm(targets[:, None, :] - found[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    return {int(r): objects[int(c)] for r, c in zip(rows, cols)}


def score(image: Image.Image | np.ndarray, specs: list[ShapeSpec]) -> dict[str, float]:
    """Share of `specs` whose colour, shape, size and position the image shows, in [0, 1].

    Only the len(specs) largest objects compete, each spec is matched to the object nearest its
    described position (one object per spec), and an unmatched spec scores 0 on every attribute.
    "all" is the share of specs right on every attribute at once.
    """
    if not specs:
        raise ValueError("score needs at least one spec")
    matched = _match(specs, read_image(image, max_objects=len(specs)))
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0.0)
    for index, spec in enumerate(specs):
        obj = matched.get(index)
        if obj is None:
            continue
        hits = [getattr(obj, name) == getattr(spec, name) for name in ATTRIBUTES]
        for name, hit in zip(ATTRIBUTES, hits):
            totals[name] += hit
        totals["all"] += all(hits)
    return {name: value / len(specs) for name, value in totals.items()}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Average per-image scores into one dict (the evaluation's shapes accuracy)."""
    if not scores:
        return {}
    return {name: float(np.mean([s[name] for s in scores])) for name in scores[0]}

