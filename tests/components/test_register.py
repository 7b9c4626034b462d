"""The registered model: bundle round trip, pyfunc predictions, champion/challenger decisions."""

import os

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch

from dalle_pipeline.components import checkpoint
from dalle_pipeline.components.clip.model import LOCAL_DIR, ClipScorer, architecture, register_architecture
from dalle_pipeline.components.config import ClipConfig, TokenizerConfig, resolve
from dalle_pipeline.components.dvae.model import DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.prior.model import Prior, PriorModelConfig
from dalle_pipeline.components.register.bundle import Bundle, build
from dalle_pipeline.components.register.run import CHAMPION, MODEL_NAME, register_version
from dalle_pipeline.components.text.tokenizer import train_and_save as train_tokenizer
from dalle_pipeline.components.tracking import Tracker, fluent_store

CAPTIONS = ["a small red circle in the center", "a large blue square at the top"] * 10


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A bundle of randomly initialised models: what matters here is the plumbing, not the pictures."""
    root = tmp_path_factory.mktemp("bundle")
    cfg = resolve("micro")
    torch.manual_seed(0)
    dvae_cfg = DVAEModelConfig(image_size=32, codebook_size=64, n_hid=8, num_groups=3)
    dvae_dir = checkpoint.save(root / "dvae", "dvae", DiscreteVAE(dvae_cfg).state_dict(), dvae_cfg.to_dict())
    tokenizer_path, _ = train_tokenizer(TokenizerConfig(vocab_size=300), CAPTIONS, root / "tok")
    prior_cfg = PriorModelConfig(text_vocab=300, image_vocab=64, text_len=24, grid_size=8, layers=1, d_model=32,
                                 heads=2)
    prior_dir = checkpoint.save(root / "prior", "prior", Prior(prior_cfg).state_dict(), prior_cfg.to_dict())
    clip_cfg = ClipConfig(model_name="register-test-clip", embed_dim=16, vision_width=32, vision_layers=1,
                          text_width=32, text_layers=1)
    register_architecture(clip_cfg, 32, root / "arch")
    clip_dir = ClipScorer.build(clip_cfg.model_name).save(root / "clip", architecture(clip_cfg, 32))
    return build(root / "bundle", cfg, dvae_dir, prior_dir, tokenizer_path, LOCAL_DIR + str(clip_dir))


def test_bundle_generates_the_best_images_by_clip_score(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    images, scores = bundle.generate(["a small red circle", "a blue square"], num_images=3, seed=1)
    assert images.shape == (2, 3, 32, 32, 3) and images.dtype.name == "uint8"
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    again, _ = bundle.generate(["a small red circle", "a blue square"], num_images=3, seed=1)
    assert (again == images).all()  # seeded


def _scene():
    from dalle_pipeline.components.corpus.shapes import ShapeSpec, render

    return render([ShapeSpec("green", "triangle", "large", "center")], 32)


def test_image_to_image_keeps_the_given_images_top_token_rows_in_every_candidate(bundle_dir):
    """The paper's zero-shot image-to-image: the top K of the grid's 8 token rows are the given image's
    own tokens in every candidate of every prompt; the rest is drawn."""
    from dalle_pipeline.components.images import to_float
    from dalle_pipeline.components.sample.run import draw_candidate_tokens

    bundle = Bundle.load(bundle_dir)
    image = _scene()
    own = bundle.dvae.encode(to_float(np.array(image)[None]))
    prefix = bundle.image_prefix(image, 3)
    assert torch.equal(prefix, own[:, :24])
    assert bundle.image_prefix(image).shape == (1, 4 * 8)  # half the grid by default
    prompts = ["a large green triangle", "a small red circle"]
    tokens, _ = draw_candidate_tokens(bundle.cfg.sample, prompts, bundle.prior, bundle.tokenizer, 0,
                                      prefix.expand(2, -1))
    assert (tokens[:, :, :24] == own[0, :24]).all()
    assert not (tokens[:, :, 24:] == own[0, 24:]).all(), "the rows below the prefix were not drawn"
    images, scores = bundle.generate(prompts, num_images=2, seed=0, image=image, prefix_rows=3)
    assert images.shape == (2, 2, 32, 32, 3) and (scores[:, :-1] >= scores[:, 1:]).all()
    larger = image.resize((96, 64))  # fitted to the model's size first: centre-cropped and scaled
    assert bundle.image_prefix(larger, 2).shape == (1, 16)


@pytest.mark.parametrize(("with_image", "rows", "message"), [(True, 0, "between 1 and 7"), (True, 8, "between 1 and 7"),
                                                              (False, 2, "needs an image")])
def test_image_to_image_refuses_a_prefix_it_cannot_take(bundle_dir, with_image, rows, message):
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(ValueError, match=message):
        bundle.generate(["a red circle"], image=_scene() if with_image else None, prefix_rows=rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA device")
def test_sampling_on_cuda_without_a_cuda_device_is_refused_by_name(bundle_dir):
    with pytest.raises(ValueError, match="sample.device is 'cuda', but this machine has no CUDA device"):
        Bundle.load(bundle_dir).generate(["a small red circle"], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bundle_generates_on_the_gpu_with_a_bf16_prior(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    images, scores = bundle.generate(["a small red circle", "a blue square"], num_images=3, seed=1, device="cuda")
    assert images.shape == (2, 3, 32, 32, 3) and (scores[:, :-1] >= scores[:, 1:]).all()
    assert next(bundle.prior.parameters()).dtype == torch.bfloat16 and bundle.clip.device.type == "cuda"
    again, _ = bundle.generate(["a small red circle", "a blue square"], num_images=3, seed=1, device="cuda")
    assert (again == images).all()


def test_champion_moves_only_to_a_better_model_on_the_same_evaluation_set(bundle_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    artifacts = (tmp_path / "artifacts").as_uri()
    prompts = ["a small red circle in the center"]

    def register(value, eval_prompts=prompts):
        tracker = Tracker.start(uri, "pipeline", artifact_root=artifacts)
        return register_version(bundle_dir, {"oracle_colour_reranked": value}, eval_prompts, tracker)

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    first = register(0.5)
    # registering must not repoint the process: later clients and subprocesses keep their own store
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert mlflow.get_registry_uri() != uri
    assert first.promoted and "no champion yet" in first.decision
    worse = register(0.4)
    assert not worse.promoted and "does not beat" in worse.decision
    better = register(0.7)
    assert better.promoted and "beats" in better.decision
    other_set = register(0.9, ["another prompt"])
    assert not other_set.promoted and "another set" in other_set.decision

    tracker = Tracker.start(uri, "check", artifact_root=artifacts)
    champion = tracker.client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert str(champion.version) == better.version == "3"
    assert tracker.client.get_model_version(MODEL_NAME, worse.version).tags["champion_decision"] == worse.decision

    import pandas as pd

    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    predictions = model.predict(pd.DataFrame({"prompt": ["a red circle", "a blue square"], "num_images": [2, 2]}))
    assert list(predictions["rank"]) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="'prompt' column"):
        model.predict(pd.DataFrame({"caption": ["a red circle"]}))

    from dalle_pipeline.components.register.bundle import png_base64

    # image-to-image through the registered model: an `image_png` column (and `prefix_rows`)
    given = png_base64(np.asarray(_scene()))
    completed = model.predict(pd.DataFrame({"prompt": ["a large green triangle"], "num_images": [2],
                                            "image_png": [given], "prefix_rows": [4]}))
    assert list(completed["rank"]) == [0, 1]
    with pytest.raises(ValueError, match=r"image_png is empty in rows \[1\]"):
        model.predict(pd.DataFrame({"prompt": ["a", "b"], "image_png": [given, None]}))
    with pytest.raises(ValueError, match="image_png of row 0 is not a base64-encoded image"):
        model.predict(pd.DataFrame({"prompt": ["a"], "image_png": ["bm90IGFuIGltYWdl"]}))


def test_a_model_registered_before_the_layout_moved_still_loads_and_generates(bundle_dir, tmp_path):
    """The pyfunc pickles its class by module path; the move to top-level folders kept that path."""
    import shutil
    from pathlib import Path

    import pandas as pd

    logged = Path(__file__).resolve().parents[1] / "fixtures" / "pyfunc_registered_before_move"
    assert b"dalle_pipeline.components.register.run" in (logged / "python_model.pkl").read_bytes()
    model_dir = tmp_path / "model"
    shutil.copytree(logged, model_dir, ignore=shutil.ignore_patterns("README.md"))
    shutil.copytree(bundle_dir, model_dir / "artifacts" / "bundle")
    model = mlflow.pyfunc.load_model(str(model_dir))
    predictions = model.predict(pd.DataFrame({"prompt": ["a small red circle"], "num_images": [2]}))
    assert list(predictions["rank"]) == [0, 1] and all(len(png) > 100 for png in predictions["image_png"])


def test_the_sample_stage_completes_only_the_scenes_image_to_image_is_judged_on(bundle_dir, tmp_path):
    """Of four scenes, the two whose every shape starts in the given top half and one continues below
    are completed (their prompts' indices saved with them); a shape wholly given or wholly below is
    left out, and a set with none of those completes nothing (its file says so)."""
    from dalle_pipeline.components.corpus.shapes import ShapeSpec, render
    from dalle_pipeline.components.sample.run import sample_models

    bundle = Bundle.load(bundle_dir)
    specs = [[ShapeSpec("white", "circle", "small", "top")],      # wholly in the given rows
             [ShapeSpec("green", "square", "large", "center")],   # starts above the middle, ends below
             [ShapeSpec("blue", "circle", "small", "bottom")],    # wholly below
             [ShapeSpec("red", "triangle", "large", "left")]]
    scenes = np.stack([np.asarray(render(s, 32)) for s in specs])
    prompts = ["a small white circle", "a large green square", "a small blue circle", "a large red triangle"]
    result = sample_models(bundle.cfg.sample, prompts, bundle.prior, bundle.dvae, bundle.tokenizer, bundle.clip,
                           tmp_path / "some", scenes=scenes, specs=specs)
    completions = np.load(result.completions)
    assert completions["prompt_index"].tolist() == [1, 3]
    assert (completions["scenes"] == scenes[[1, 3]]).all()
    assert completions["images"].shape == (2, bundle.cfg.sample.keep, 32, 32, 3)
    assert (tmp_path / "some" / "completions.png").exists()
    none = sample_models(bundle.cfg.sample, prompts[::2], bundle.prior, bundle.dvae, bundle.tokenizer, bundle.clip,
                         tmp_path / "none", scenes=scenes[::2], specs=specs[::2])
    assert np.load(none.completions)["prompt_index"].tolist() == []
    assert not (tmp_path / "none" / "completions.png").exists()
