import json
import shutil

import numpy as np
import pytest
import torch

from dalle_pipeline.components.evaluate.run import (_trace_sqrt_from_covariances, _trace_sqrt_from_samples,
                                                     find_inception_weights, frechet_distance, inception_cache_path,
                                                     inception_fid, score_samples)


def test_identical_sets_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(200_000, 3))
    b = rng.normal(1.0, 2.0, size=(200_000, 3))
    # |mu1 - mu2|^2 + sum(s1^2 + s2^2 - 2 s1 s2) = 3 + 3 * (1 + 4 - 4) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.02)


def test_sample_space_and_covariance_space_give_the_same_trace():
    """frechet_distance takes the N1 x N2 route when samples are fewer than dimensions: same number."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 40)), rng.normal(0.5, 2.0, size=(25, 40))
    assert _trace_sqrt_from_samples(a, b) == pytest.approx(_trace_sqrt_from_covariances(a.T @ a, b.T @ b), rel=1e-7)
    assert _trace_sqrt_from_samples(a, b) > 0


def test_small_sample_gives_a_real_number_and_a_warning():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="rank-deficient"):
        value = frechet_distance(rng.normal(size=(5, 64)), rng.normal(size=(4, 64)))
    assert np.isfinite(value) and value > 0


def test_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 generated"):
        frechet_distance(np.zeros((10, 4)), np.zeros((1, 4)))


# FID: torchmetrics with an Inception weights file written here, never downloaded


def _shapes(count: int, colour: tuple[int, int, int], seed: int) -> np.ndarray:
    """(count, 32, 32, 3) uint8: one filled square of `colour` per image on white, placed at random."""
    rng = np.random.default_rng(seed)
    images = np.full((count, 32, 32, 3), 255, np.uint8)
    for image in images:
        (row, col), half = rng.integers(6, 26, size=2), rng.integers(3, 7)
        image[row - half : row + half, col - half : col + half] = colour
    return images


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception saved the way its release file is: a plain dict of
    tensors (no BatchNorm step counters), which its loader reads with torch.load. Kaiming-initialised
    convolutions keep the 2048 pool features at a usable scale through the 40-odd random layers."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    class RandomInception(inception_module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is not None:  # None: construction, where the random initialisation stays
                return super().load_state_dict(state_dict, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # no download, whatever happens
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: None)
        torch.manual_seed(0)
        model = RandomInception("random-inception", ["2048"])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    from dalle_pipeline.components.clip.model import ClipScorer, register_architecture
    from dalle_pipeline.components.config import ClipConfig

    cfg = ClipConfig(model_name="evaluate-test-clip", embed_dim=16, vision_width=32, vision_layers=1, text_width=32,
                     text_layers=1, patch_size=8)
    register_architecture(cfg, 32, tmp_path_factory.mktemp("arch"))
    torch.manual_seed(0)
    return ClipScorer.build(cfg.model_name)


@pytest.fixture(scope="module")
def evaluation_inputs(tmp_path_factory):
    """2 prompts x 4 candidates, 2 kept each. The kept candidates ARE the reference images (red squares);
    the candidates reranking dropped are noise, so only `all` differs from the reference."""
    references = _shapes(4, (255, 0, 0), seed=0)
    noise = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    images = np.stack([np.stack([noise[0], references[0], noise[1], references[1]]),
                       np.stack([references[2], noise[2], references[3], noise[3]])])
    ranking = np.array([[1, 3], [0, 2]])
    clip_scores = np.zeros((2, 4), np.float32)
    np.put_along_axis(clip_scores, ranking, 0.3, axis=1)
    samples = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(samples, images=images, clip_scores=clip_scores, ranking=ranking)
    return samples, references


def test_fid_is_zero_for_the_reference_images_and_grows_with_the_rejected_candidates(
        inception_weights, random_clip, evaluation_inputs, tmp_path, recwarn):
    samples, references = evaluation_inputs
    metrics = score_samples(samples, ["a red square"] * 2, references, random_clip, tmp_path,
                  inception_weights=str(inception_weights))
    assert metrics["fid_reranked"] == pytest.approx(0.0, abs=1e-2)  # the kept set is the reference set
    assert metrics["fid_all"] > 10.0  # half of it is noise
    assert json.loads((tmp_path / "metrics.json").read_text())["fid_all"] == pytest.approx(metrics["fid_all"])
    assert "fid_skipped" not in json.loads((tmp_path / "metrics.json").read_text())
    assert any("4 real samples for 2048-dim features" in str(w.message) for w in recwarn)


def test_fid_is_the_value_torchmetrics_computes(inception_weights):
    """Same features, torchmetrics' own compute(); at the 64-feature layer, where its D x D eigvals are cheap."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    reference, generated = _shapes(6, (255, 0, 0), seed=0), _shapes(6, (0, 0, 255), seed=1)
    with pytest.warns(UserWarning, match="rank-deficient"):
        ours = inception_fid(inception_weights, reference, {"blue": generated}, feature=64)["blue"]
    metric = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(inception_weights))
    metric.update(torch.from_numpy(reference).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(generated).permute(0, 3, 1, 2), real=False)
    assert ours > 0.01
    assert ours == pytest.approx(metric.compute().item(), rel=1e-4)


def test_fid_ranks_a_set_of_the_same_kind_closer_than_another_kind(inception_weights):
    reference = _shapes(6, (255, 0, 0), seed=0)
    with pytest.warns(UserWarning, match="rank-deficient"):
        scores = inception_fid(inception_weights, reference,
                               {"same": reference, "red": _shapes(6, (255, 0, 0), seed=1),
                                "blue": _shapes(6, (0, 0, 255), seed=1)})
    assert scores["same"] == pytest.approx(0.0, abs=1e-2)
    assert 0.0 < scores["red"] < scores["blue"]  # new red squares are nearer than blue ones


@pytest.mark.filterwarnings("ignore:.*rank-deficient")  # fd_clip on 4 images
def test_without_inception_weights_fid_is_skipped_with_one_line(random_clip, evaluation_inputs, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # an empty torch hub cache
    samples, references = evaluation_inputs
    metrics = score_samples(samples, ["a red square"] * 2, references, random_clip, tmp_path / "out")
    lines = [line for line in capsys.readouterr().out.splitlines() if "fid skipped" in line]
    assert len(lines) == 1 and "no Inception weights" in lines[0] and "empty-torch-home" in lines[0]
    assert not any(key.startswith("fid") for key in metrics)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["fid_skipped"] == "no Inception weights"
    assert not any(key.startswith("fid_") and key != "fid_skipped" for key in written)
    assert "fd_clip_all" in metrics and "clip_score_reranked" in metrics  # the rest is still measured


def test_inception_weights_are_found_in_the_torch_hub_cache(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_inception_weights(None) is None
    cached = inception_cache_path()
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    shutil.copy(inception_weights, cached)
    assert find_inception_weights(None) == cached
    assert find_inception_weights(inception_weights) == inception_weights  # a configured file wins


def test_a_configured_weights_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="sample.inception_weights.*absent.pth"):
        find_inception_weights(tmp_path / "absent.pth")


class PickledObject:
    """Stands for anything a weights_only load refuses: unpickling it could run code."""


def test_a_weights_file_that_would_run_pickled_code_is_refused(tmp_path):
    path = tmp_path / "inception.pth"
    torch.save({"weights": torch.zeros(1), "hook": PickledObject()}, path)
    with pytest.raises(ValueError, match="not a plain state_dict"):
        inception_fid(path, _shapes(2, (255, 0, 0), 0), {"all": _shapes(2, (255, 0, 0), 1)})


def test_the_share_of_distinct_candidates_counts_pixel_identical_copies_once():
    from dalle_pipeline.components.evaluate.run import distinct_share

    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 8, 8, 3), dtype=np.uint8)
    assert distinct_share(images) == 1.0
    images[0, 1:] = images[0, 0]  # the first prompt's four candidates are one image
    images[1, 3] = images[1, 2]
    assert distinct_share(images) == pytest.approx((1 / 4 + 3 / 4) / 2)


def test_caption_retrieval_ranks_each_image_against_the_whole_pool(random_clip):
    from dalle_pipeline.components.evaluate.run import caption_retrieval
    from dalle_pipeline.components.images import to_float

    pool = [f"a {colour} {shape}" for colour in ("red", "green", "blue", "white") for shape in ("square", "circle")]
    images = np.random.default_rng(3).integers(0, 256, size=(3, 2, 32, 32, 3), dtype=np.uint8)
    # each image's similarity to every caption, through the scorer's own pairwise scores (not the ranking code)
    scores = np.array([[float(random_clip.scores(to_float(image[None]), [caption])[0]) for caption in pool]
                       for image in images[:, 0]])
    best = [pool[i] for i in scores.argmax(1)]
    worst = [pool[i] for i in scores.argmin(1)]
    same = np.repeat(images[:, :1], 2, axis=1)  # both candidates of a prompt are that prompt's first image
    assert caption_retrieval(random_clip, same, best, pool) == {"top1": 1.0, "top5": 1.0}
    assert caption_retrieval(random_clip, same, worst, pool) == {"top1": 0.0, "top5": 0.0}  # ranked 8th of 8


def test_retrieval_is_logged_beside_its_chance_level(random_clip, evaluation_inputs, tmp_path):
    samples, references = evaluation_inputs
    pool = ["a red square", "a blue circle", "a green triangle", "a white square", "a cyan circle", "a pink one"]
    with pytest.warns(UserWarning, match="rank-deficient"):
        metrics = score_samples(samples, ["a red square", "a blue circle"], references, random_clip, tmp_path,
                      retrieval_pool=pool)
    assert metrics["retrieval_chance_top1"] == pytest.approx(1 / 6)
    assert metrics["retrieval_chance_top5"] == pytest.approx(5 / 6)
    for name in ("retrieval_top1_reranked", "retrieval_top5_all"):
        assert 0 <= metrics[name] <= 1


def test_the_tokenizers_reconstructions_of_the_references_get_their_own_fid(inception_weights, random_clip,
                                                                             evaluation_inputs, tmp_path, recwarn):
    from dalle_pipeline.components.dvae.model import DiscreteVAE, DVAEModelConfig, reconstruct
    from dalle_pipeline.components.evaluate.run import inception_fid

    samples, references = evaluation_inputs
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAEModelConfig(image_size=32, codebook_size=16, n_hid=8)).eval()  # untrained: blurry
    metrics = score_samples(samples, ["a red square"] * 2, references, random_clip, tmp_path,
                  inception_weights=str(inception_weights), dvae=dvae)
    expected = inception_fid(inception_weights, references, {"r": reconstruct(dvae, references)})["r"]
    assert metrics["fid_reconstructions"] == pytest.approx(expected, rel=1e-6)
    assert metrics["fid_reconstructions"] > 1.0 and metrics["fid_reranked"] == pytest.approx(0.0, abs=1e-2)
    without = score_samples(samples, ["a red square"] * 2, references, random_clip, tmp_path / "no-dvae",
                  inception_weights=str(inception_weights))
    assert "fid_reconstructions" not in without


def _completions(scenes, images, prefix_rows=4, grid=8):
    return {"images": images, "scenes": scenes, "prompt_index": np.arange(len(scenes)),
            "prefix_rows": np.array(prefix_rows), "grid": np.array(grid)}


def test_image_to_image_is_scored_on_the_scenes_whose_shapes_the_prefix_starts():
    """A completion that is its scene finishes every shape; one whose lower half is background does
    not. A shape wholly below the given rows (nothing to finish from) or wholly inside them (nothing
    to finish) is left out of the score."""
    from dalle_pipeline.components.corpus.shapes import ShapeSpec, render
    from dalle_pipeline.components.evaluate.run import image_to_image_metrics

    specs = [[ShapeSpec("green", "square", "large", "center")],   # rows 9-22 of 32: given 0-15, continues below
             [ShapeSpec("red", "triangle", "large", "left")],
             [ShapeSpec("white", "circle", "small", "top")],      # rows 3-11: wholly given
             [ShapeSpec("blue", "circle", "small", "bottom")]]    # rows 20-29: nothing of it given
    scenes = np.stack([np.asarray(render(s, 32)) for s in specs])
    perfect = image_to_image_metrics(_completions(scenes, scenes[:, None]), specs)
    assert perfect["i2i_scenes"] == pytest.approx(2 / 4)
    assert perfect["i2i_oracle_colour"] == perfect["i2i_oracle_shape"] == 1.0
    assert perfect["i2i_prefix_psnr"] == pytest.approx(100.0)

    cut = scenes.copy()
    cut[:, 16:] = scenes[0, 0, 0]  # the background below the given rows: the shapes are left unfinished
    unfinished = image_to_image_metrics(_completions(scenes, cut[:, None]), specs)
    assert unfinished["i2i_prefix_psnr"] == pytest.approx(100.0)  # the given rows came back
    assert unfinished["i2i_oracle_size"] < 1.0 and unfinished["i2i_oracle_all"] == 0.0  # half a shape is smaller

    # the sample stage completes the two that count only, and says whose they are
    only = {**_completions(scenes[:2], scenes[:2, None]), "prompt_index": np.array([0, 1])}
    assert image_to_image_metrics(only, specs) == perfect


def _png(rng, side: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_held_out_set_reads_only_its_own_images_and_equals_reading_every_sample(tmp_path, monkeypatch):
    from dalle_pipeline.components import shards
    from dalle_pipeline.components.evaluate import evaluation_set
    from dalle_pipeline.components.shards import HOLDOUT_DIR, Sample, holdout_rank, iter_samples, write_shard

    rng = np.random.default_rng(0)
    holdout = tmp_path / "cur" / HOLDOUT_DIR
    samples = [Sample(f"{index:05d}", _png(rng, 8 + index % 3 * 4), "png", f"caption {index}",
                      {"url": f"https://x/{index}.jpg"} if index % 4 else {}) for index in range(60)]
    again = [Sample("99999", _png(rng, 8), "png", "a later copy", {"url": "https://x/7.jpg"})]  # the later one counts
    write_shard(holdout / "00000.tar", samples[:25])
    write_shard(holdout / "00001.tar", samples[25:] + again)
    write_shard(tmp_path / "cur" / "00000.tar", [Sample("training", _png(rng, 8), "png", "not held out")])

    def reference(max_references, ids=None):
        """The set as built before it streamed: every held-out sample, images and all, in a dict."""
        everything = {sample.meta.get("url") or sample.key: sample for sample in iter_samples(holdout)}
        order = [item for item in ids if item in everything] if ids is not None else \
            sorted(everything, key=holdout_rank)[:max_references]
        images = [shards.fitted_pixels(everything[item].image_bytes, 8) for item in order]
        return order, [everything[item].caption for item in order], np.stack(images)

    images_read = []
    real_tar_members = shards.tar_members
    monkeypatch.setattr(shards, "tar_members", lambda *args, **kwargs: (
        images_read.append(member[0]) or member for member in real_tar_members(*args, **kwargs)))
    champions = ["https://x/7.jpg", "gone", "00004", "https://x/9.jpg", "00004"]
    for max_references, ids in [(10, None), (59, None), (500, None), (10, champions)]:
        images_read.clear()
        built = evaluation_set.holdout_evaluation_set(tmp_path / "cur", 8, 4, max_references, ids=ids)
        images_built = [name for name in images_read if name.endswith(".png")]
        order, captions, references = reference(max_references, ids)
        assert (built.ids, built.captions, built.prompts) == (order, captions, captions[:4])
        assert np.array_equal(built.references, references)
        assert len(images_built) == len(set(order))  # no other image was read
    assert "a later copy" in built.captions and built.ids[-1] == "00004"
