"""Shapes corpus: the oracle reads the generator's images back, zero-shot pairs stay out of training, output is reproducible."""

from __future__ import annotations

import itertools
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from dalle_pipeline.components.config import CorpusConfig
from dalle_pipeline.components.corpus.shapes import run as generate_corpus
from dalle_pipeline.components.corpus import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    caption,
    eval_set,
    mean_scores,
    read_image,
    render,
    sample_specs,
    score,
    specs_from_json,
)

ZERO_SHOT = [("red", "triangle"), ("blue", "circle")]


def test_vocabulary_is_as_documented():
    assert len(COLOURS) == 8 and SHAPES == ("circle", "square", "triangle")
    assert list(SIZES) == ["small", "large"] and len(POSITIONS) == 9
    palette = np.array([*COLOURS.values(), BACKGROUND], dtype=float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=2)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 80  # far apart, noise can't swap them


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([ShapeSpec("red", "circle", "small", "top left")], "a small red circle in the top left"),
        ([ShapeSpec("blue", "square", "large", "center")], "a large blue square in the center"),
        ([ShapeSpec("cyan", "triangle", "small", "top")], "a small cyan triangle at the top"),
        ([ShapeSpec("white", "circle", "large", "right")], "a large white circle on the right"),
        (
            [ShapeSpec("green", "square", "small", "left"), ShapeSpec("orange", "circle", "small", "bottom right")],
            "a small green square on the left and a small orange circle in the bottom right",
        ),
    ],
)
def test_caption_template(specs, expected):
    assert caption(specs) == expected


def test_unknown_attributes_are_refused():
    with pytest.raises(ValueError, match="unknown colour 'magenta'"):
        ShapeSpec("magenta", "circle", "small", "top")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        sample_specs(np.random.default_rng(0), 1, zero_shot_pairs=[("red", "hexagon")])


@pytest.mark.parametrize("image_size", [32, 64])
def test_oracle_reads_every_single_shape_exactly(image_size):
    for colour, shape, size, position in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        spec = ShapeSpec(colour, shape, size, position)
        image = render([spec], image_size)
        assert [obj.as_spec() for obj in read_image(image)] == [spec]
        assert score(np.asarray(image), [spec])["all"] == 1.0


@pytest.mark.parametrize("image_size", [32, 64])
def test_oracle_scores_random_multi_shape_scenes_near_perfectly(image_size):
    rng = np.random.default_rng(7)
    scenes = [sample_specs(rng, 3, ZERO_SHOT) for _ in range(300)]
    assert max(len(specs) for specs in scenes) == 3
    accuracy = mean_scores([score(render(specs, image_size), specs) for specs in scenes])
    assert min(accuracy.values()) >= 0.98, accuracy


def test_oracle_tolerates_blur_and_noise_and_gives_zero_for_nothing():
    rng = np.random.default_rng(11)
    scores = []
    for _ in range(100):
        specs = sample_specs(rng, 2, ZERO_SHOT)
        blurred = np.asarray(render(specs, 32).filter(ImageFilter.GaussianBlur(0.6)), dtype=float)
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
        scores.append(score(noisy, specs))
    assert min(mean_scores(scores).values()) >= 0.9

    spec = [ShapeSpec("red", "circle", "small", "top")]
    empty = Image.new("RGB", (32, 32), BACKGROUND)
    assert score(empty, spec) == dict.fromkeys(["colour", "shape", "size", "position", "all"], 0.0)
    speckle = np.asarray(empty).copy()
    speckle[5, 5] = speckle[20, 27] = COLOURS["red"]  # single pixels are not shapes
    assert read_image(speckle) == []


def test_oracle_notices_a_wrong_attribute():
    drawn = ShapeSpec("red", "circle", "small", "top left")
    image = render([drawn], 32)
    assert score(image, [ShapeSpec("red", "square", "small", "top left")]) == {
        "colour": 1.0, "shape": 0.0, "size": 1.0, "position": 1.0, "all": 0.0,
    }
    assert score(image, [ShapeSpec("yellow", "circle", "large", "bottom")])["colour"] == 0.0
    two = score(image, [drawn, ShapeSpec("green", "square", "small", "bottom right")])  # one of two drawn
    assert two["all"] == 0.5


def test_zero_shot_pairs_never_appear_in_training_and_only_they_in_zero_shot():
    rng = np.random.default_rng(0)
    training = [spec for _ in range(2000) for spec in sample_specs(rng, 3, ZERO_SHOT)]
    pairs = {(spec.colour, spec.shape) for spec in training}
    assert pairs.isdisjoint(ZERO_SHOT) and len(pairs) == 8 * 3 - len(ZERO_SHOT)
    zero_shot = eval_set(CorpusConfig(max_shapes=2, zero_shot_pairs=ZERO_SHOT), n=50, seed=5, zero_shot=True)
    assert {(s.colour, s.shape) for item in zero_shot for s in item.specs} == set(ZERO_SHOT)


def _file_path(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file"
    return Path(url2pathname(parsed.path))


def test_generate_writes_existing_file_urls_and_is_byte_for_byte_reproducible(tmp_path):
    cfg = CorpusConfig(num_images=60, max_shapes=3, zero_shot_pairs=ZERO_SHOT, seed=4)
    result = generate_corpus(cfg, tmp_path / "a")
    assert result.num_images == 60 and result.url_list == (tmp_path / "a" / "urls.parquet").resolve()

    table = pq.read_table(result.url_list)
    assert table.column_names == ["url", "caption", "objects"] and table.num_rows == 60
    for row in table.to_pylist():
        path = _file_path(row["url"])
        assert path.is_file() and path.parent == result.images_dir
        specs = specs_from_json(row["objects"])
        assert caption(specs) == row["caption"]
        assert not {(s.colour, s.shape) for s in specs} & set(ZERO_SHOT), row["caption"]
        assert score(Image.open(path), specs)["all"] == 1.0
    assert sorted(p.name for p in result.images_dir.iterdir())[:2] == ["000000.png", "000001.png"]

    first_bytes = result.url_list.read_bytes()
    first_image = (result.images_dir / "000007.png").read_bytes()
    again = generate_corpus(cfg, tmp_path / "a")
    assert again.url_list.read_bytes() == first_bytes
    assert (again.images_dir / "000007.png").read_bytes() == first_image
    other_seed = generate_corpus(cfg.model_copy(update={"seed": 5}), tmp_path / "b")
    assert pq.read_table(other_seed.url_list)["caption"] != table["caption"]


def test_eval_set_is_deterministic_and_not_the_training_corpus(tmp_path):
    cfg = CorpusConfig(num_images=20, max_shapes=2, zero_shot_pairs=ZERO_SHOT, seed=0)
    first, again = eval_set(cfg, n=20, seed=0), eval_set(cfg, n=20, seed=0)
    assert [item.caption for item in first] == [item.caption for item in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    assert all(item.caption == caption(item.specs) and item.image.size == (32, 32) for item in first)
    assert all(score(item.image, item.specs)["all"] == 1.0 for item in first)
    training = pq.read_table(generate_corpus(cfg, tmp_path).url_list)["caption"].to_pylist()
    assert [item.caption for item in first] != training  # same seed, separate random stream
