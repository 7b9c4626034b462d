import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_pipeline.components.config import DVAEConfig
from dalle_pipeline.components.dvae import train as dvae_train
from dalle_pipeline.components.dvae.model import (BEFORE_FIELDS, KIND, DiscreteVAE, DVAEModelConfig, kl_to_uniform,
                                                  logit_laplace_nll, reconstruction_quality)
from dalle_pipeline.components.dvae.model import load as load_dvae
from dalle_pipeline.components.tracking import Tracker

DRIVER = """
import sys
from pathlib import Path
from dalle_pipeline.components.config import DVAEConfig
from dalle_pipeline.components.dvae import train
cfg = DVAEConfig.model_validate_json(sys.argv[1])
train.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), 32, seed=0)
"""


def _train_in_a_driver(cfg: DVAEConfig, curated: Path, out_dir: Path, kill_after_checkpoints: int = 0) -> str:
    """Train in a driver process of its own, as a pipeline run does; SIGKILL its whole process group
    (driver, local Ray, workers) once `kill_after_checkpoints` checkpoints are on disk. Its output."""
    log = out_dir.with_suffix(".log")
    with log.open("wb") as output:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, cfg.model_dump_json(), str(curated), str(out_dir)],
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while kill_after_checkpoints and driver.poll() is None and time.monotonic() < deadline:
            if len([p for p in out_dir.glob("ray/*/checkpoint_*") if p.is_dir()]) >= kill_after_checkpoints:
                os.killpg(driver.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        code = driver.wait(timeout=300)
    text = log.read_text(errors="replace")
    assert code == (-signal.SIGKILL if kill_after_checkpoints else 0), text[-3000:]
    return text


def test_schedules_hit_their_endpoints():
    cfg = DVAEConfig(temperature_anneal_steps=100, kl_warmup_steps=10)
    assert dvae_train.temperature_at(0, cfg) == pytest.approx(1.0)
    assert dvae_train.temperature_at(100, cfg) == pytest.approx(1 / 16)
    assert dvae_train.temperature_at(10_000, cfg) == pytest.approx(1 / 16)
    assert dvae_train.temperature_at(50, cfg) == pytest.approx((1 + 1 / 16) / 2)
    assert dvae_train.kl_weight_at(0, cfg) == 0.0
    assert dvae_train.kl_weight_at(5, cfg) == pytest.approx(3.3)
    assert dvae_train.kl_weight_at(10, cfg) == pytest.approx(6.6)
    assert dvae_train.kl_weight_at(10_000, cfg) == pytest.approx(6.6)


def test_logit_laplace_nll_equals_the_density_written_out():
    torch.manual_seed(0)
    stats = torch.randn(2, 6, 4, 4)
    x = torch.rand(2, 3, 4, 4) * 0.8 + 0.1
    mu, log_b = stats[:, :3], stats[:, 3:]
    b = log_b.exp()
    density = 1 / (2 * b * x * (1 - x)) * torch.exp(-(torch.log(x / (1 - x)) - mu).abs() / b)
    expected = -density.log().flatten(1).sum(1)
    torch.testing.assert_close(logit_laplace_nll(stats, x), expected, rtol=1e-4, atol=1e-3)


def test_kl_to_uniform_is_zero_for_uniform_and_log_k_for_one_hot():
    uniform = torch.zeros(1, 16, 2, 2)
    assert kl_to_uniform(uniform).item() == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.full((1, 16, 1, 1), -1e4)
    one_hot[:, 3] = 0
    assert kl_to_uniform(one_hot).item() == pytest.approx(math.log(16), rel=1e-4)


def test_one_hot_decode_path_equals_argmax_token_path():
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEModelConfig(image_size=16, codebook_size=32, n_hid=8, num_groups=2,
                                        quantizer="gumbel")).eval()
    images = torch.rand(3, 3, 16, 16)
    logits = model.logits(images)
    one_hot = F.one_hot(logits.argmax(1), 32).permute(0, 3, 1, 2).float()
    via_codes = model.decode_stats_to_image(model.decode_codes(one_hot))
    via_tokens = model.decode(model.encode(images))
    torch.testing.assert_close(via_codes, via_tokens)
    assert model.encode(images).shape == (3, 8 * 8)


def test_loss_falls_and_checkpoint_rebuilds_the_model(curated_shards, tmp_path, micro_config, local_ray, capfd):
    """Two Ray Train workers (DDP over gloo), each with half of every batch."""
    cfg = micro_config.dvae.model_copy(deep=True)
    cfg.optim.steps, cfg.optim.log_every, cfg.recon_grid_every, cfg.num_workers = 40, 10, 20, 2
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "dvae-test", artifact_root=(tmp_path / "art").as_uri())
    result = dvae_train.run(cfg, curated_shards, tmp_path / "dvae", micro_config.corpus.image_size, seed=0,
                            shapes=micro_config.corpus, tracker=tracker)
    for metric in ("psnr", "commitment", "codebook_perplexity", "codes_used", "images_per_s"):  # vq: no kl to anneal
        steps = [m.step for m in tracker.client.get_metric_history(tracker.run_id, metric)]
        assert steps == [10, 20, 30, 40], f"{metric} logged once per window by rank 0 only: {steps}"
    assert result.recon_grid.exists()
    grids = sorted(p.name for p in (tmp_path / "dvae" / "reconstructions").iterdir())
    assert grids == ["step_0000000.png", "step_0000020.png", "step_0000040.png"]  # the untrained one first
    # what a person sees: the stage's progress lines, not Ray Train's two long lines per checkpoint, the five
    # of its worker group's start, or MLflow's four of the system metrics monitor
    out, err = capfd.readouterr()
    assert "[dvae] step 40/40" in out + err
    noise = ("Checkpoint successfully created", "Reporting training result", "training worker group",
             "Setting up process group", "world_rank=0", "monitoring system metrics", "Skip logging GPU metrics")
    assert not [line for line in (out + err).splitlines() if any(phrase in line for phrase in noise)]
    model = load_dvae(result.checkpoint_dir)
    assert model.cfg.codebook_size == cfg.codebook_size
    assert "eval_psnr" in result.metrics and result.metrics["eval_psnr"] > 0
    # the trained model reconstructs its corpus better than a fresh one (hard codes, no noise)
    from dalle_pipeline.components.shards import load_corpus

    images = load_corpus(curated_shards, 32).images[:32]
    torch.manual_seed(1)
    fresh = DiscreteVAE(model.cfg).eval()
    trained = reconstruction_quality(model, images, 32)[0]
    assert trained["eval_recon_mse"] < reconstruction_quality(fresh, images, 32)[0]["eval_recon_mse"]
    # measured in any batch, the same: the stage measures in its training batches (where it fits), not 256 at once
    assert reconstruction_quality(model, images, 5)[0] == pytest.approx(trained, rel=1e-5)

    # the oracle read the reconstructions of held-out scenes, logged beside PSNR; 40 updates keep
    # far less than every colour, so the floor stops the stage
    oracle = {name: value for name, value in result.metrics.items() if name.startswith("recon_oracle_")}
    assert set(oracle) == {f"recon_oracle_{name}" for name in ("colour", "shape", "size", "position", "all")}
    assert all(0 <= value <= 1 for value in oracle.values())
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    assert logged["recon_oracle_colour"] == pytest.approx(oracle["recon_oracle_colour"])
    weakest = min(value for name, value in oracle.items() if name != "recon_oracle_all")
    assert weakest < 0.95
    dvae_train.check_recon_floor(result.metrics, weakest, tmp_path / "dvae")  # at the floor passes
    with pytest.raises(ValueError, match=r"held-out shapes scenes keep .*below dvae.recon_oracle_floor 0.95"):
        dvae_train.check_recon_floor(result.metrics, 0.95, tmp_path / "dvae")


def test_a_reconstruction_oracle_below_the_floor_fails_the_stage(curated_shards, tmp_path, micro_config, local_ray):
    """An untrained-for-long dVAE on the shapes corpus: the stage saves its weights, then fails saying
    which attributes its reconstructions lose, with what it measured on its run."""
    cfg = micro_config.dvae.model_copy(deep=True)
    cfg.optim.steps, cfg.recon_oracle_floor = 5, 0.99
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "dvae-test", artifact_root=(tmp_path / "art").as_uri())
    with pytest.raises(ValueError, match=r"keep colour \d\.\d\d.*dvae.recon_oracle_floor 0.99"):
        dvae_train.run(cfg, curated_shards, tmp_path / "dvae", micro_config.corpus.image_size, seed=0,
                       shapes=micro_config.corpus, tracker=tracker)
    assert load_dvae(tmp_path / "dvae" / "checkpoint").cfg.codebook_size == cfg.codebook_size
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    assert 0 <= logged["recon_oracle_colour"] < 0.99 and "eval_psnr" in logged


@pytest.mark.parametrize(("recon_loss", "quantizer"), [("logit_laplace", "gumbel"), ("mse", "gumbel"), ("mse", "vq")])
def test_training_history_shows_the_loss_falling(curated_shards, recon_loss, quantizer):
    from dalle_pipeline.components.shards import load_corpus
    from dalle_pipeline.components.training import TensorBatches, fit

    corpus = load_corpus(curated_shards, 32)
    cfg = DVAEConfig(n_hid=8, codebook_size=32, temperature_anneal_steps=60, kl_warmup_steps=10,
                     recon_loss=recon_loss, quantizer=quantizer)
    cfg.optim.steps, cfg.optim.log_every, cfg.optim.batch_size, cfg.optim.warmup_steps = 60, 10, 32, 5
    torch.manual_seed(0)
    model = DiscreteVAE(dvae_train.model_config(cfg, 32))
    result = fit(model, dvae_train.dvae_loss(cfg), iter(TensorBatches((torch.from_numpy(corpus.images),), 32, 0)),
                 cfg.optim)
    nll = [row["nll"] for row in result.history]
    assert nll[-1] < nll[0] - 0.5


def _vq(codebook_size=16, **fields):
    torch.manual_seed(0)
    return DiscreteVAE(DVAEModelConfig(quantizer="vq", codebook_size=codebook_size, code_dim=4, n_hid=8, **fields))


def test_vq_codes_are_unit_vectors_from_k_means_and_tokens_decode_through_them():
    model = _vq()
    images = torch.rand(6, 3, 32, 32)
    assert not bool(model.codebook.initialised)
    logits, stats, commitment = model.train()(images, 1.0)
    assert bool(model.codebook.initialised) and logits.shape == (6, 16, 8, 8) and stats.shape == (6, 6, 32, 32)
    assert torch.allclose(model.codebook.codes.norm(dim=1), torch.ones(16), atol=1e-5)
    assert logits.abs().max() <= 1 + 1e-5  # cosines
    assert 0 <= float(commitment.detach()) <= 4
    tokens = model.eval().encode(images)
    assert tokens.shape == (6, 64) and int(tokens.max()) < 16
    # the decoder sees the code vectors the tokens name, as in training (straight through)
    vectors = model.codebook.codes[tokens.view(6, 8, 8)].permute(0, 3, 1, 2)
    torch.testing.assert_close(model.decode(tokens), model.decode_stats_to_image(model.decode_codes(vectors)))


def test_vq_restarts_a_code_nothing_uses_and_round_trips_its_checkpoint(tmp_path):
    from dalle_pipeline.components import checkpoint

    model = _vq().train()
    images = torch.rand(6, 3, 32, 32)
    model(images, 1.0)  # k-means
    model.codebook.codes[3] = -model.codebook.codes[3]  # far from everything: no position takes it
    model.codebook.cluster_sum[3] = model.codebook.codes[3]
    model.codebook.cluster_count[3] = model.codebook.DEAD_CODE_COUNT * 1.005
    before = model.codebook.codes[3].clone()
    model(images, 1.0)  # its count decays below the threshold: restarted at an encoder output
    assert float(model.codebook.cluster_count[3]) == model.codebook.RESTART_COUNT
    assert not torch.allclose(model.codebook.codes[3], before)

    saved = checkpoint.save(tmp_path / "vq", KIND, model.state_dict(), model.cfg.to_dict())
    loaded = load_dvae(saved)
    assert loaded.cfg.quantizer == "vq" and torch.equal(loaded.encode(images), model.eval().encode(images))


def test_a_gumbel_checkpoint_written_before_the_quantizer_field_still_loads(tmp_path):
    from dalle_pipeline.components import checkpoint

    from dalle_pipeline.components.config import resolve
    from dalle_pipeline.components.saved_configs import upgrade

    cfg = DVAEModelConfig(codebook_size=16, n_hid=8, quantizer="gumbel")
    old_config = {k: v for k, v in cfg.to_dict().items() if k not in ("quantizer", "code_dim", "codebook_decay")}
    saved = checkpoint.save(tmp_path / "old", KIND, DiscreteVAE(cfg).state_dict(), old_config)
    assert load_dvae(saved).cfg.quantizer == "gumbel"
    # a retrain of a champion registered before: its config names a gumbel dVAE, and fine-tuning
    # takes the checkpoint as the same model (and another kind as another)
    old_pipeline = resolve("tiny").model_dump(mode="json")
    del old_pipeline["dvae"]["quantizer"]
    assert resolve(base=upgrade(old_pipeline)).dvae.quantizer == "gumbel"
    legacy = {**DVAEModelConfig().to_dict(), **BEFORE_FIELDS}
    checkpoint.check_same_model(saved, KIND, cfg.to_dict(), "dvae.init_from", defaults=legacy)
    with pytest.raises(ValueError, match=r"differs in \['code_dim', 'quantizer'\]"):
        checkpoint.check_same_model(saved, KIND, cfg.model_copy(update={"quantizer": "vq", "code_dim": 4}).to_dict(),
                                    "dvae.init_from", defaults=legacy)


@pytest.mark.slow  # kill-and-resume; fit's own resume is in test_training_loop
@pytest.mark.parametrize("image_data", ["memory", "stream"])
def test_a_killed_driver_resumes_at_the_same_step_with_the_same_weights(curated_shards, tmp_path, image_data):
    """Kill the driver, its local Ray and both workers mid-run, start it again on the same folder:
    Ray Train restores the latest checkpoint (weights, optimizer, EMA, every rank's RNG, step), the
    data continue where they stopped (in memory, or streamed: the shuffle buffer replayed to the
    step), and the result equals an uninterrupted run bit for bit."""
    cfg = DVAEConfig(n_hid=8, codebook_size=32, num_workers=2, checkpoint_every=10, temperature_anneal_steps=60,
                     kl_warmup_steps=10, recon_grid_every=1000, image_data=image_data)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every, cfg.optim.warmup_steps = 60, 32, 10, 5
    _train_in_a_driver(cfg, curated_shards, tmp_path / "uninterrupted")
    _train_in_a_driver(cfg, curated_shards, tmp_path / "killed", kill_after_checkpoints=2)
    assert not (tmp_path / "killed" / "checkpoint").exists()
    output = _train_in_a_driver(cfg, curated_shards, tmp_path / "killed")
    resumed_at = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "resuming from the checkpoint" in line]
    assert resumed_at and 0 < resumed_at[0] < 60, "the second run started again from step 0"
    reference = load_dvae(tmp_path / "uninterrupted" / "checkpoint").state_dict()
    resumed = load_dvae(tmp_path / "killed" / "checkpoint").state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=f"{name} differs")


def test_fine_tuning_refuses_a_dvae_of_another_architecture(curated_shards, tmp_path):
    """Checked on the driver, before Ray starts: the message names the setting and what differs."""
    from dalle_pipeline.components import checkpoint

    small = DVAEModelConfig(image_size=32, codebook_size=32, n_hid=8, num_groups=3)
    saved = checkpoint.save(tmp_path / "small", KIND, DiscreteVAE(small).state_dict(), small.to_dict())
    cfg = DVAEConfig(n_hid=16, codebook_size=32, init_from=str(saved))
    with pytest.raises(ValueError, match=r"dvae.init_from .*differs in \['n_hid'\]"):
        dvae_train.run(cfg, curated_shards, tmp_path / "dvae", 32, seed=0)


def test_the_discriminator_learns_its_hinge_and_its_generator_loss_reaches_the_dvae_only():
    from dalle_pipeline.components.dvae.losses import PatchDiscriminator, discriminator_loss, generator_loss

    torch.manual_seed(0)
    discriminator = PatchDiscriminator(width=8)
    vae = _vq()
    real = torch.rand(4, 3, 32, 32)
    fake = vae.decode_stats_to_image(vae(real, 1.0)[1])
    assert discriminator(real).shape == (4, 1, 6, 6)  # a logit per overlapping patch

    generator_loss(discriminator, fake).backward(retain_graph=True)
    assert all(p.grad is None for p in discriminator.parameters()), "the decoder's loss trained the discriminator"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    vae.zero_grad(set_to_none=True)
    discriminator_loss(discriminator, real, fake).backward()
    assert all(p.grad is None for p in vae.parameters()), "the discriminator's loss reached the dVAE"
    assert all(p.grad is not None for p in discriminator.parameters())
    # hinge: no loss once real patches score above +1 and reconstructed ones below -1
    confident = lambda images: torch.where(images.mean() > 0.5, 2.0, -2.0) * torch.ones(len(images), 1, 6, 6)  # noqa: E731
    assert float(discriminator_loss(confident, torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))) == 0


def test_the_perceptual_distance_reads_vgg16_weights_from_a_file_and_names_a_wrong_one(tmp_path):
    """Weights created and saved here, as a user's downloaded torchvision vgg16 would be."""
    from torchvision.models import vgg16

    from dalle_pipeline.components.dvae.losses import PerceptualDistance

    torch.manual_seed(0)
    full = tmp_path / "vgg16.pt"
    torch.save({k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}, full)
    distance = PerceptualDistance.from_file(full)
    assert not any(p.requires_grad for p in distance.parameters())
    images, other = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    assert torch.allclose(distance(images, images), torch.zeros(3), atol=1e-6)
    far, near = distance(images, other), distance(images, (images + 0.02 * other).clamp(0, 1))
    assert (far > near).all() and (near > 0).all()

    with pytest.raises(FileNotFoundError, match=r"dvae.perceptual_weights: no file .*missing.pt"):
        PerceptualDistance.from_file(tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet.pt is not torchvision's vgg16 \(missing \['0.bias'"):
        PerceptualDistance.from_file(tmp_path / "resnet.pt")
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(ValueError, match=r"notes.pt is not a torch state dict"):
        PerceptualDistance.from_file(tmp_path / "notes.pt")
    with pytest.raises(ValueError, match=r"dvae.perceptual_weight 1.0 needs dvae.perceptual_weights"):
        DVAEConfig(perceptual_weight=1.0)


def test_adversarial_and_perceptual_training_exports_the_tokenizer_alone(curated_shards, tmp_path, micro_config,
                                                                          local_ray):
    """Two Ray Train workers (DDP): the discriminator trains inside the model, its weights are in the
    training checkpoints a resumed run restores, and not in the dVAE checkpoint the pipeline uses."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    torch.save(vgg16(weights=None).features.state_dict(), tmp_path / "vgg16_features.pt")
    cfg = micro_config.dvae.model_copy(update={
        "adversarial_weight": 0.1, "adversarial_start": 10, "discriminator_width": 8, "perceptual_weight": 0.5,
        "perceptual_weights": str(tmp_path / "vgg16_features.pt"), "num_workers": 2, "checkpoint_every": 10,
        "recon_oracle_floor": 0.0})
    cfg.optim = cfg.optim.model_copy(update={"steps": 20, "log_every": 10})
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "dvae-gan", artifact_root=(tmp_path / "art").as_uri())
    result = dvae_train.run(cfg, curated_shards, tmp_path / "dvae", 32, seed=0, tracker=tracker)
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    assert {"discriminator_loss", "adversarial", "perceptual"} <= set(logged)
    assert all(math.isfinite(logged[name]) for name in ("discriminator_loss", "adversarial", "perceptual"))

    states = sorted((tmp_path / "dvae" / "ray").glob("*/checkpoint_*/train_state.pt"))
    assert states
    trained = torch.load(states[-1], weights_only=True)["model"]
    assert any(key.startswith("discriminator.") for key in trained)
    exported = load_dvae(result.checkpoint_dir)
    assert not any(key.startswith("discriminator.") for key in exported.state_dict())
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
