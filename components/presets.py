"""The presets, as data: dotted-field overrides on top of the configs' defaults (which are `tiny`).

`config.resolve(preset, overrides)` applies one; `dalle-pipeline config --preset P` prints the result.
"""

from __future__ import annotations

from typing import Any, Literal

# Presets are data: dotted-field overrides on top of the defaults (which are `tiny`).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # micro: the tests' preset; every stage runs, nothing is expected to be learned well.
    "micro": {
        "corpus.num_images": 256,
        "dvae.n_hid": 16,
        "dvae.codebook_size": 64,
        "dvae.optim.steps": 30,
        "dvae.optim.batch_size": 32,
        "dvae.temperature_anneal_steps": 30,
        "dvae.kl_warmup_steps": 10,
        "dvae.recon_oracle_floor": 0.0,  # 30 updates learn next to nothing
        "tokenizer.vocab_size": 300,
        "prior.layers": 2,
        "prior.d_model": 64,
        "prior.heads": 2,
        "prior.optim.steps": 30,
        "prior.optim.batch_size": 32,
        "prior.optim.warmup_steps": 5,
        "prior.optim.log_every": 10,
        "prior.checkpoint_every": 15,
        "clip.optim.steps": 20,
        "clip.optim.batch_size": 32,
        "clip.optim.warmup_steps": 5,
        "clip.optim.log_every": 10,
        "dvae.optim.log_every": 10,
        "dvae.optim.warmup_steps": 5,
        "sample.num_prompts": 4,
        "sample.candidates": 4,
        "sample.keep": 2,
        "sample.grid_prompts": 4,
        "download.samples_per_shard": 100,
    },
    "small": {
        "corpus.num_images": 100_000,
        "corpus.image_size": 64,
        "corpus.max_shapes": 2,
        "dvae.codebook_size": 1024,
        "dvae.n_hid": 64,
        "dvae.quantizer": "gumbel",  # not measured against vq at this size yet
        "dvae.recon_oracle_floor": 0.0,
        "dvae.recon_loss": "logit_laplace",
        "dvae.num_groups": 3,
        "dvae.blocks_per_group": 2,
        "dvae.optim.steps": 20_000,
        "dvae.optim.batch_size": 64,
        "dvae.optim.precision": "auto",
        "dvae.optim.ema_decay": 0.99,
        "dvae.temperature_anneal_steps": 15_000,
        "dvae.kl_warmup_steps": 2_000,
        "tokenizer.vocab_size": 4096,
        "tokenizer.text_len": 64,
        "prior.layers": 12,
        "prior.d_model": 768,
        "prior.heads": 12,
        "prior.optim.steps": 50_000,
        "prior.optim.lr": 3e-4,
        "prior.optim.min_lr": 3e-5,
        "clip.vision_width": 256,
        "clip.vision_layers": 6,
        "clip.text_width": 256,
        "clip.text_layers": 6,
        "clip.embed_dim": 256,
        "clip.context_length": 64,
        "clip.optim.steps": 10_000,
        "sample.candidates": 64,
        "sample.keep": 8,
    },
    "paper": {
        "corpus.image_size": 256,
        "dvae.codebook_size": 8192,
        "dvae.n_hid": 256,
        "dvae.quantizer": "gumbel",  # the paper's dVAE, faithful
        "dvae.decoder_layout": "openai",  # OpenAI's released dVAE tensor for tensor (`dvae.pretrained` loads it)
        "dvae.recon_oracle_floor": 0.0,
        "dvae.recon_loss": "logit_laplace",
        "dvae.num_groups": 4,
        "dvae.blocks_per_group": 2,
        "dvae.temperature_anneal_steps": 150_000,
        "dvae.kl_warmup_steps": 5_000,
        "dvae.optim.steps": 3_000_000,
        "dvae.optim.batch_size": 64,
        "dvae.optim.lr": 1e-4,
        "dvae.optim.min_lr": 1.25e-6,
        "dvae.optim.ema_decay": 0.999,
        "dvae.optim.precision": "auto",
        "tokenizer.vocab_size": 16384,
        "tokenizer.text_len": 256,
        "tokenizer.bpe_dropout": 0.1,
        "prior.layers": 64,
        "prior.d_model": 3968,
        "prior.heads": 62,
        "prior.optim.steps": 1000,  # a smoke run's length, as before tiny's prior went to 500
        "prior.optim.lr": 4.5e-4,
        "prior.optim.betas": (0.9, 0.96),
        "prior.optim.weight_decay": 4.5e-2,
        "prior.optim.grad_clip": 4.0,
        # 16 bytes a parameter of weights, gradients and Adam moments (183 GiB) fit no GPU whole: sharded
        "prior.parallel": "fsdp",
        "clip.model_name": "ViT-B-32",
        "clip.pretrained": "openai",
        "sample.candidates": 512,
        "sample.keep": 32,
    },
    # one-gpu: your own photographs at 256 px on one GPU, through a released VQGAN f16 tokenizer (16x16 tokens,
    # no tokenizer training) and a prior of about 270M parameters. The files it reads are never downloaded:
    # README.md, "Pretrained tokenizers", says which to fetch and where they go.
    "one-gpu": {
        "corpus.image_size": 256,
        "dvae.pretrained.kind": "taming",
        "dvae.pretrained.path": "~/.cache/dalle-pipeline/vqgan_imagenet_f16_16384/checkpoints/last.ckpt",
        "dvae.optim.steps": 0,
        "dvae.recon_oracle_floor": 0.0,
        "tokenizer.vocab_size": 16384,
        "tokenizer.text_len": 64,
        "prior.layers": 16,
        "prior.d_model": 1024,
        "prior.heads": 16,
        "prior.optim.steps": 100_000,
        "prior.optim.batch_size": 64,
        "prior.optim.lr": 3e-4,
        "prior.optim.min_lr": 3e-5,
        "prior.optim.warmup_steps": 2_000,
        "prior.checkpoint_every": 2_000,
        "clip.model_name": "ViT-B-32",
        "clip.pretrained": "openai",  # or a local open_clip weights file: --set clip.pretrained=/path/to/file
        "sample.candidates": 64,
        "sample.keep": 8,
    },
}


# the preset names as a type: Prefect turns it into a drop-down in a deployment's parameter form
PresetName = Literal["tiny", "micro", "small", "paper", "one-gpu"]
assert set(PresetName.__args__) == set(PRESETS), "PresetName must list every preset"
