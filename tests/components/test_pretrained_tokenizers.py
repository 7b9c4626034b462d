"""Pretrained tokenizers checked against their authors' own code (installed from PyPI in the test extra):
files saved exactly as each author publishes them, with random weights, read through `dvae.pretrained`,
and both forwards compared on the same images (fp32 on the CPU): tokens identical, reconstructions
within 1e-5."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dalle_pipeline.components import checkpoint
from dalle_pipeline.components.config import PretrainedTokenizer
from dalle_pipeline.components.dvae import pretrained, restricted_pickle
from dalle_pipeline.components.dvae.model import KIND, DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.dvae.model import load as load_tokenizer
from dalle_pipeline.components.dvae.vqgan import VQGAN

dall_e = pytest.importorskip("dall_e")  # the test extra installs it; pip install -e ".[test]"


def _images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator)


# OpenAI's dVAE -----------------------------------------------------------------------------------------------

def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random biases too (dall_e initialises them to zero, which would hide a bias loaded in the wrong place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory) -> tuple[Path, nn.Module, nn.Module]:
    """OpenAI's Encoder and Decoder at their smallest legal width, pickled whole as OpenAI published them."""
    folder = tmp_path_factory.mktemp("openai_dvae")
    encoder = _randomise(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), seed=1).eval()
    decoder = _randomise(dall_e.Decoder(n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32), seed=2).eval()
    torch.save(encoder, folder / "encoder.pkl")
    torch.save(decoder, folder / "decoder.pkl")
    return folder, encoder, decoder


def test_openai_dvae_files_load_as_the_paper_dvae_and_match_openai_forward(openai_files):
    folder, encoder, decoder = openai_files
    model = pretrained.load(PretrainedTokenizer(kind="openai", path=str(folder)), image_size=32)
    assert isinstance(model, DiscreteVAE) and model.cfg.decoder_layout == "openai"
    assert (model.cfg.codebook_size, model.cfg.n_hid, model.cfg.decoder_width, model.cfg.grid_size) == (512, 64, 32, 4)
    images = _images(4, 32)
    with torch.no_grad():
        theirs_tokens = torch.argmax(encoder(dall_e.map_pixels(images)), dim=1)
        one_hot = F.one_hot(theirs_tokens, num_classes=512).permute(0, 3, 1, 2).float()
        theirs_images = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
    tokens = model.encode(images)
    assert torch.equal(tokens, theirs_tokens.flatten(1))
    assert torch.allclose(model.decode(tokens), theirs_images, atol=1e-5, rtol=0)


def test_the_paper_presets_dvae_is_openais_tensor_for_tensor():
    """The paper dVAE at OpenAI's sizes: every tensor of dall_e's Encoder and Decoder, shape for shape, in order."""
    from dalle_pipeline.components.config import resolve
    from dalle_pipeline.components.dvae.train import model_config

    cfg = resolve("paper").dvae
    with torch.device("meta"):
        ours = DiscreteVAE(model_config(cfg, 256))
        theirs_encoder, theirs_decoder = dall_e.Encoder(device="meta"), dall_e.Decoder(device="meta")
    for part, theirs in ((ours.encoder, theirs_encoder), (ours.decoder, theirs_decoder)):
        assert [tuple(t.shape) for t in part.state_dict().values()] == \
               [tuple(t.shape) for t in theirs.state_dict().values()]
    assert sum(t.numel() for t in ours.decoder.parameters()) == sum(t.numel() for t in theirs_decoder.parameters())


def test_a_checkpoint_of_the_mirrored_decoder_still_loads(tmp_path):
    """Checkpoints written before decoder_layout existed name no layout, and load as the mirrored one they are."""
    cfg = DVAEModelConfig(quantizer="gumbel", codebook_size=64, n_hid=16)
    model = DiscreteVAE(cfg)
    saved = {key: value for key, value in cfg.to_dict().items() if key not in ("decoder_layout", "decoder_width")}
    checkpoint.save(tmp_path / "old", KIND, model.state_dict(), saved)
    loaded = load_tokenizer(tmp_path / "old")
    assert loaded.cfg.decoder_layout == "mirrored"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_pickle_naming_any_other_class_is_refused_by_name_and_nothing_runs(tmp_path, openai_files):
    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = Path("/tmp/pwned-by-pickle")
    marker.unlink(missing_ok=True)
    torch.save({"weights": torch.zeros(2), "payload": Payload()}, folder / "encoder.pkl")
    (folder / "decoder.pkl").write_bytes((openai_files[0] / "decoder.pkl").read_bytes())
    with pytest.raises(restricted_pickle.RefusedFile, match=r"encoder\.pkl: refused: it names posix\.system"):
        pretrained.load(PretrainedTokenizer(kind="openai", path=str(folder)), image_size=32)
    assert not marker.exists()


def test_truncated_and_swapped_openai_files_fail_naming_the_file(tmp_path, openai_files):
    source = openai_files[0]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "encoder.pkl").write_bytes((source / "encoder.pkl").read_bytes()[:5000])
    (truncated / "decoder.pkl").write_bytes((source / "decoder.pkl").read_bytes())
    with pytest.raises(ValueError, match=r"truncated/encoder\.pkl: not a readable torch file"):
        pretrained.load_openai(truncated, 32)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "encoder.pkl").write_bytes((source / "decoder.pkl").read_bytes())
    (swapped / "decoder.pkl").write_bytes((source / "encoder.pkl").read_bytes())
    with pytest.raises(ValueError, match=r"encoder\.pkl: holds a dall_e\.decoder\.Decoder, expected OpenAI's"):
        pretrained.load_openai(swapped, 32)
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrained.load_openai(tmp_path, 32)


# taming-transformers VQGAN -------------------------------------------------------------------------------------

pytest.importorskip("taming.modules.diffusionmodules.model")
from pretrained_files import Payload, TamingVQModel, save_taming  # noqa: E402  (after the skip)


@pytest.mark.parametrize("gumbel", [False, True], ids=["VQModel", "GumbelVQ"])
def test_taming_vqgan_checkpoints_load_and_match_the_authors_forward(tmp_path, gumbel):
    torch.manual_seed(3)
    theirs = TamingVQModel(gumbel).eval()
    theirs.place_codes(_images(8, 32, seed=9) * 2 - 1)
    ckpt, _ = save_taming(theirs, tmp_path / "logs" / "vqgan")
    marker = Path("/tmp/pwned-by-pickle")
    marker.unlink(missing_ok=True)
    model = pretrained.load(PretrainedTokenizer(kind="taming", path=str(ckpt)), image_size=32)
    assert not marker.exists()  # the callbacks' classes were read as inert stand-ins, never called
    assert isinstance(model, VQGAN) and (model.cfg.grid_size, model.cfg.codebook_size) == (8, 64)
    images = _images(4, 32, seed=5)
    theirs_tokens = theirs.tokens(images * 2 - 1)
    tokens = model.encode(images)
    assert torch.equal(tokens, theirs_tokens.flatten(1))
    assert len(tokens.unique()) > 8
    expected = (theirs.reconstruct(theirs_tokens).clamp(-1, 1) + 1) / 2
    assert torch.allclose(model.decode(tokens), expected, atol=1e-5, rtol=0)


def test_a_vqgan_round_trips_through_a_tokenizer_checkpoint_and_a_retrain_fine_tunes_it(tmp_path, curated_shards,
                                                                                         micro_config):
    from dalle_pipeline.components.dvae import train as dvae_train

    torch.manual_seed(4)
    ckpt, _ = save_taming(TamingVQModel(gumbel=False), tmp_path / "logs" / "vqgan")
    model = pretrained.load_taming(ckpt, None, 32)
    checkpoint.save(tmp_path / "saved", KIND, model.state_dict(), model.cfg.to_dict())
    loaded = load_tokenizer(tmp_path / "saved")
    images = _images(2, 32)
    assert isinstance(loaded, VQGAN) and torch.equal(loaded.encode(images), model.encode(images))
    # a registered model's VQGAN, as retrain_dvae points at it: the stage trains that VQGAN, whatever the
    # dvae.* architecture fields say
    cfg = micro_config.dvae.model_copy(deep=True, update={"init_from": str(tmp_path / "saved")})
    assert dvae_train.architecture(cfg, 32) == loaded.cfg


def test_a_taming_checkpoint_its_config_disagrees_with_fails_naming_both(tmp_path):
    ckpt, config = save_taming(TamingVQModel(gumbel=False), tmp_path / "logs" / "vqgan")
    document = yaml.safe_load(config.read_text())
    document["model"]["params"]["n_embed"] = 128
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=r"last\.ckpt: not the taming\.models\.vqgan\.VQModel model\.yaml "
                                         r"describes: shapes \['quantize\.embedding\.weight \(64, 32\)"):
        pretrained.load_taming(ckpt, None, 32)
    document["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=r"model\.yaml: model\.target taming\.models\.cond_transformer"):
        pretrained.load_taming(ckpt, None, 32)
    document["model"]["target"], document["model"]["params"]["n_embed"] = "taming.models.vqgan.VQModel", 64
    config.write_text(yaml.safe_dump(document))
    not_lightning = tmp_path / "weights.ckpt"
    with not_lightning.open("wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(ValueError, match=r"weights\.ckpt: not a readable torch file"):
        pretrained.load_taming(not_lightning, str(config), 32)



# a diffusers VQModel (aMUSEd's VQ) -----------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("mid_attention", [True, False], ids=["mid-attention", "amused-no-mid-attention"])
def test_a_diffusers_vqmodel_folder_loads_and_matches_the_authors_forward(tmp_path, mid_attention):
    torch.manual_seed(7)
    theirs = diffusers.VQModel(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=16,
                               num_vq_embeddings=64, vq_embed_dim=16, norm_num_groups=8, sample_size=32,
                               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                               mid_block_add_attention=mid_attention).eval()
    images = _images(4, 32, seed=8)
    with torch.no_grad():
        latents = theirs.encode(images * 2 - 1).latents
        flat = latents.permute(0, 2, 3, 1).reshape(-1, 16)
        theirs.quantize.embedding.weight.copy_(flat[torch.randperm(len(flat))[:64]])  # codes where outputs are
        _, _, (_, _, theirs_tokens) = theirs.quantize(latents)
        b, _, h, w = latents.shape
        quant = theirs.quantize.get_codebook_entry(theirs_tokens, (b, h, w, 16))
        expected = (theirs.decode(quant, force_not_quantize=True).sample.clamp(-1, 1) + 1) / 2
    theirs.save_pretrained(tmp_path / "vqvae")
    model = pretrained.load(PretrainedTokenizer(kind="diffusers", path=str(tmp_path / "vqvae")), image_size=32)
    assert isinstance(model, VQGAN) and (model.cfg.grid_size, model.cfg.codebook_size) == (8, 64)
    tokens = model.encode(images)
    assert torch.equal(tokens, theirs_tokens.view(b, -1))
    assert len(tokens.unique()) > 8
    assert torch.allclose(model.decode(tokens), expected, atol=1e-5, rtol=0)


def test_a_diffusers_folder_of_another_model_or_truncated_weights_fails_naming_the_file(tmp_path):
    folder = tmp_path / "vae"
    diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"vae/config\.json: not a VQModel this reader builds: \{'_class_name': "
                                         r"'AutoencoderKL'"):
        pretrained.load_diffusers(folder, 32)
    vq = tmp_path / "vq"
    diffusers.VQModel(block_out_channels=(32,), norm_num_groups=8, num_vq_embeddings=64).save_pretrained(vq)
    weights = vq / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: not a readable safetensors file"):
        pretrained.load_diffusers(vq, 32)

# the dVAE stage with a pretrained tokenizer ---------------------------------------------------------------------

def test_the_stage_records_a_pretrained_vqgan_without_training(curated_shards, tmp_path, micro_config):
    from dalle_pipeline.components.dvae import train as dvae_train
    from dalle_pipeline.components.tracking import Tracker

    torch.manual_seed(6)
    ckpt, _ = save_taming(TamingVQModel(gumbel=False), tmp_path / "logs" / "vqgan")
    cfg = micro_config.dvae.model_copy(deep=True, update={
        "pretrained": PretrainedTokenizer(kind="taming", path=str(ckpt)),
        "optim": micro_config.dvae.optim.model_copy(update={"steps": 0})})
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "dvae-test", artifact_root=(tmp_path / "art").as_uri())
    result = dvae_train.run(cfg, curated_shards, tmp_path / "dvae", 32, seed=0, shapes=micro_config.corpus,
                            tracker=tracker)
    assert result.step == 0 and not (tmp_path / "dvae" / "ray").exists()  # nothing trained
    assert result.recon_grid.exists()
    assert {"eval_psnr", "eval_codes_used", "recon_oracle_shape"} <= set(result.metrics)
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    assert logged["eval_psnr"] == pytest.approx(result.metrics["eval_psnr"])
    saved = load_tokenizer(result.checkpoint_dir)
    assert isinstance(saved, VQGAN) and saved.cfg.grid_size == 8
    assert checkpoint.read_config(result.checkpoint_dir, KIND)[1]["pretrained"]["kind"] == "taming"


@pytest.mark.parametrize("gumbel", [False, True], ids=["VQModel", "GumbelVQ"])
def test_a_taming_vqgan_fine_tunes_from_its_files(curated_shards, tmp_path, micro_config, local_ray, gumbel):
    from dalle_pipeline.components.dvae import train as dvae_train

    torch.manual_seed(12)
    ckpt, _ = save_taming(TamingVQModel(gumbel=gumbel).place_codes(_images(8, 32, seed=2) * 2 - 1),
                          tmp_path / "logs" / "vqgan")
    cfg = micro_config.dvae.model_copy(deep=True, update={"pretrained": PretrainedTokenizer(kind="taming", path=str(ckpt))})
    cfg.optim.steps, cfg.optim.log_every, cfg.optim.batch_size, cfg.optim.warmup_steps = 4, 2, 16, 1
    result = dvae_train.run(cfg, curated_shards, tmp_path / "dvae", 32, seed=0)
    assert result.step == 4 and {"recon_mse", "commitment", "codes_used"} <= set(result.metrics)
    tuned, start = load_tokenizer(result.checkpoint_dir), pretrained.load_taming(ckpt, None, 32)
    assert isinstance(tuned, VQGAN) and tuned.cfg == start.cfg
    moved = {key for key, value in tuned.state_dict().items() if not torch.equal(value, start.state_dict()[key])}
    assert {"encoder.conv_in.weight", "decoder.conv_out.weight"} <= moved
    with pytest.raises(ValueError, match=r"dvae\.recon_loss logit_laplace fine-tuning the VQGAN .*recon_loss=mse"):
        dvae_train.run(cfg.model_copy(update={"recon_loss": "logit_laplace"}), curated_shards, tmp_path / "again",
                       32, seed=0)


def test_openais_dvae_fine_tunes_from_its_files(curated_shards, tmp_path, micro_config, openai_files, local_ray):
    from dalle_pipeline.components.dvae import train as dvae_train

    folder = openai_files[0]
    cfg = micro_config.dvae.model_copy(deep=True, update={"pretrained": PretrainedTokenizer(kind="openai", path=str(folder))})
    cfg.optim.steps, cfg.optim.log_every, cfg.optim.batch_size = 4, 2, 16
    result = dvae_train.run(cfg, curated_shards, tmp_path / "dvae", 32, seed=0)
    assert result.step == 4
    tuned, start = load_tokenizer(result.checkpoint_dir), pretrained.load_openai(folder, 32)
    assert tuned.cfg == start.cfg and tuned.cfg.decoder_layout == "openai"
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values())]
    assert all(changed)  # every tensor moved from OpenAI's
