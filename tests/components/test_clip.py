"""CLIP: our architecture through open_clip, the local-weights loaders, and reranking by CLIP score."""

import pytest
import torch
from safetensors.torch import save_file

from dalle_pipeline.components.clip.model import LOCAL_DIR, ClipScorer, architecture, register_architecture
from dalle_pipeline.components.clip.model import load
from dalle_pipeline.components.clip.train import run
from dalle_pipeline.components.config import ClipConfig
from dalle_pipeline.components.sample.generate import rerank

CFG = ClipConfig(model_name="test-clip", embed_dim=16, vision_width=32, vision_layers=1, text_width=32,
                 text_layers=1, patch_size=8)


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    torch.manual_seed(0)
    register_architecture(CFG, 32, tmp_path_factory.mktemp("arch"))
    return ClipScorer.build(CFG.model_name)


def test_local_dir_round_trip_gives_the_same_features(random_clip, tmp_path):
    folder = random_clip.save(tmp_path / "clip", architecture(CFG, 32))
    loaded = load(LOCAL_DIR + str(folder))
    images = torch.rand(3, 3, 32, 32)
    captions = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_features(images), random_clip.image_features(images))
        torch.testing.assert_close(loaded.text_features(captions), random_clip.text_features(captions))


def test_pretrained_weights_from_a_local_file(random_clip, tmp_path):
    """The path a user takes with downloaded weights: model name + a local checkpoint file."""
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in random_clip.model.state_dict().items()}, str(weights))
    cfg = CFG.model_copy(update={"pretrained": str(weights)})
    result = run(cfg, tmp_path / "unused", tmp_path / "out", 32, seed=0)
    scorer = load(result.clip_source)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scorer.image_features(images), random_clip.image_features(images))


def test_missing_local_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer.build(CFG.model_name, str(tmp_path / "absent.safetensors"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipScorer.load(str(tmp_path))


def test_rerank_orders_candidates_by_clip_score(random_clip):
    torch.manual_seed(0)
    candidates = torch.rand(2, 5, 3, 32, 32)
    prompts = ["a red circle", "a blue square"]
    scores = random_clip.scores(candidates.flatten(0, 1), [p for p in prompts for _ in range(5)]).view(2, 5)
    best = rerank(scores, keep=3)
    for prompt in range(2):
        kept = scores[prompt, best[prompt]]
        assert torch.all(kept[:-1] >= kept[1:])
        assert kept[-1] >= scores[prompt].sort(descending=True).values[2]
    with pytest.raises(ValueError, match="cannot keep 6 of 5"):
        rerank(scores, keep=6)


@pytest.mark.parametrize("image_data", ["memory", "stream"])
def test_training_on_the_corpus_learns_to_retrieve(curated_shards, tmp_path, image_data):
    cfg = CFG.model_copy(update={"model_name": f"test-clip-trained-{image_data}", "image_data": image_data}, deep=True)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every, cfg.optim.warmup_steps = 60, 32, 10, 5
    result = run(cfg, curated_shards, tmp_path, 32, seed=0)
    assert result.clip_source.startswith(LOCAL_DIR)
    assert result.metrics["loss"] < 3.0  # chance for a batch of 32 is ln 32 = 3.47
