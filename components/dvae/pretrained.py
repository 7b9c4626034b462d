"""Image tokenizers as their authors released them, read into this project's models (`dvae.pretrained`).

- `openai`: OpenAI's dVAE, `encoder.pkl` and `decoder.pkl` as published (whole pickled `dall_e`
  modules), read through `restricted_pickle` (no code from the files runs, on any torch) into a
  `DiscreteVAE` of `decoder_layout: openai`, tensor for tensor in the modules' own order.
- `taming`: a taming-transformers VQGAN, its Lightning `.ckpt` and its `.yaml` (`VQModel`, or
  `GumbelVQ` as ru-dalle ships it), into a `VQGAN` with the same parameter names; the checkpoint's
  other entries (callbacks, hyperparameters) are read as inert stand-ins.
- `diffusers`: a diffusers `VQModel` folder (aMUSEd's VQ): the same network under other names,
  renamed into the `VQGAN`.

Every file is checked before anything trains: a truncated or foreign file, a config its tensors
disagree with, fails naming the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import PretrainedTokenizer
from . import restricted_pickle
from .model import DiscreteVAE, DVAEModelConfig, ImageTokenizer
from .vqgan import VQGAN, VQGANConfig

OPENAI_FILES = ("encoder.pkl", "decoder.pkl")
# the classes OpenAI's pickles name; each is read as an inert stand-in, its tensors taken by path
OPENAI_CLASSES = restricted_pickle.admit_as_layers(("dall_e.", "torch.nn.modules."))
OPENAI_LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps
TAMING_TARGETS = {"taming.models.vqgan.VQModel": "nearest", "taming.models.vqgan.GumbelVQ": "gumbel"}


def _openai_tensors(path: Path, expected: str) -> list[tuple[str, torch.Tensor]]:
    module = restricted_pickle.load(path, OPENAI_CLASSES)
    name = getattr(module, "qualified_name", type(module).__name__)
    if name != expected:
        raise ValueError(f"{path}: holds a {name}, expected OpenAI's {expected} (dall_e's {Path(path).name})")
    tensors = list(restricted_pickle.module_tensors(module))
    if not tensors:
        raise ValueError(f"{path}: a {name} without tensors")
    return tensors


def _openai_shape(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """The architecture OpenAI's tensors describe; ValueError where the two files disagree."""
    try:
        groups = sorted({path.split(".")[1] for path in encoder if path.startswith("blocks.group_")})
        blocks = {path.split(".")[2] for path in encoder if path.startswith(f"blocks.{groups[0]}.block_")}
        shape = {
            "n_hid": encoder["blocks.input.w"].shape[0],
            "codebook_size": encoder["blocks.output.conv.w"].shape[0],
            "num_groups": len(groups),
            "blocks_per_group": len(blocks),
            "decoder_width": decoder["blocks.input.w"].shape[0],
        }
        decoder_codes, decoder_hid = decoder["blocks.input.w"].shape[1], decoder["blocks.output.conv.w"].shape[1]
    except (KeyError, IndexError) as error:
        raise ValueError(f"{folder}: OpenAI's dVAE files lack the tensor {error}; not dall_e's Encoder and Decoder") \
            from error
    if (decoder_codes, decoder_hid) != (shape["codebook_size"], shape["n_hid"]):
        raise ValueError(f"{folder}: encoder.pkl has {shape['codebook_size']} codes and width {shape['n_hid']}, "
                         f"decoder.pkl {decoder_codes} and {decoder_hid}: not one dVAE")
    return {key: int(value) for key, value in shape.items()}


def load_openai(folder: str | Path, image_size: int) -> DiscreteVAE:
    """OpenAI's dVAE from the folder holding `encoder.pkl` and `decoder.pkl`, as a DiscreteVAE at `image_size`."""
    folder = Path(folder)
    missing = [name for name in OPENAI_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: OpenAI's dVAE needs {' and '.join(OPENAI_FILES)}; missing {missing}")
    encoder = _openai_tensors(folder / "encoder.pkl", "dall_e.encoder.Encoder")
    decoder = _openai_tensors(folder / "decoder.pkl", "dall_e.decoder.Decoder")
    shape = _openai_shape(dict(encoder), dict(decoder), folder)
    try:
        cfg = DVAEModelConfig(**shape, quantizer="gumbel", decoder_layout="openai", image_size=image_size,
                              logit_laplace_eps=OPENAI_LOGIT_LAPLACE_EPS)
        model = DiscreteVAE(cfg)
    except ValueError as error:
        raise ValueError(f"{folder}: OpenAI's dVAE ({shape}) at image size {image_size}: {error}") from error
    for part, theirs, name in ((model.encoder, encoder, "encoder.pkl"), (model.decoder, decoder, "decoder.pkl")):
        ours = part.state_dict()
        if [tuple(t.shape) for t in ours.values()] != [tuple(t.shape) for _, t in theirs]:
            raise ValueError(f"{folder / name}: its {len(theirs)} tensors are not the layout of OpenAI's dVAE "
                             f"({len(ours)} tensors, shape for shape)")
        part.load_state_dict({key: tensor.float() for key, (_, tensor) in zip(ours, theirs)})
    return model.eval()


def _taming_config(path: Path) -> tuple[VQGANConfig, str]:
    """The VQGAN a taming `.yaml` describes (at its own resolution) and its quantizer kind."""
    try:
        document = yaml.safe_load(path.read_text())
        model = document["model"]
        target, params = model["target"], model["params"]
        dd = params["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a taming-transformers model config (model.target, model.params.ddconfig): "
                         f"{error}") from error
    if target not in TAMING_TARGETS:
        raise ValueError(f"{path}: model.target {target} is not one of {sorted(TAMING_TARGETS)}")
    unsupported = {key: value for key, value in (("double_z", dd.get("double_z", False)),
                                                 ("resamp_with_conv", not dd.get("resamp_with_conv", True)),
                                                 ("remap", params.get("remap"))) if value}
    if unsupported:
        raise ValueError(f"{path}: {unsupported} is not a VQGAN this reader builds")
    try:
        cfg = VQGANConfig(resolution=dd["resolution"], image_size=dd["resolution"], ch=dd["ch"],
                          ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                          attn_resolutions=tuple(dd["attn_resolutions"]), in_channels=dd["in_channels"],
                          out_ch=dd["out_ch"], z_channels=dd["z_channels"], embed_dim=params["embed_dim"],
                          codebook_size=params["n_embed"], quantizer=TAMING_TARGETS[target])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: its ddconfig does not describe a VQGAN: {error}") from error
    return cfg, target


def _taming_yaml(checkpoint: Path, given: str | None) -> Path:
    """The config beside a taming checkpoint: `given`, else the one `.yaml` in its folder or in the
    `configs/` folder of its log directory (taming's `logs/NAME/{checkpoints,configs}`)."""
    if given:
        return Path(given)
    for folder in (checkpoint.parent, checkpoint.parent.parent / "configs"):
        found = sorted(folder.glob("*.yaml"))
        if len(found) == 1:
            return found[0]
    raise FileNotFoundError(f"{checkpoint}: name its taming .yaml (dvae.pretrained.config); none or several found "
                            f"beside it and in {checkpoint.parent.parent / 'configs'}")


def load_taming(checkpoint: str | Path, config: str | None, image_size: int) -> VQGAN:
    """A taming-transformers VQGAN (`VQModel` or `GumbelVQ`) from its `.ckpt` and `.yaml`, at `image_size`."""
    checkpoint = Path(checkpoint)
    config_path = _taming_yaml(checkpoint, config)
    cfg, target = _taming_config(config_path)
    document = restricted_pickle.load(checkpoint, restricted_pickle.admit_anything_inert)
    state = document.get("state_dict") if isinstance(document, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: not a Lightning checkpoint (no state_dict)")
    weights = {key: value for key, value in state.items() if not key.startswith("loss.")}  # the discriminator, LPIPS
    return _load_vqgan_weights(cfg, image_size, weights, checkpoint, f"{target} {config_path.name} describes")


def _load_vqgan_weights(cfg: VQGANConfig, image_size: int, weights: dict[str, torch.Tensor], source: Path,
                        described: str) -> VQGAN:
    """A VQGAN of `cfg` at `image_size` holding `weights`; ValueError naming `source` where they are not
    the network `described` (missing, unexpected or misshapen tensors)."""
    try:
        model = VQGAN(cfg.model_copy(update={"image_size": image_size}))
    except ValueError as error:
        raise ValueError(f"{source}: at image size {image_size}: {error}") from error
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    wrong = [f"{key} {tuple(weights[key].shape)} (config: {tuple(ours[key].shape)})"
             for key in ours if key in weights and weights[key].shape != ours[key].shape]
    if missing or extra or wrong:
        raise ValueError(f"{source}: not the {described}: "
                         + "; ".join(part for part in (f"missing {missing[:4]}" if missing else "",
                                                       f"unexpected {extra[:4]}" if extra else "",
                                                       f"shapes {wrong[:4]}" if wrong else "") if part))
    model.load_state_dict({key: value.float() for key, value in weights.items()})
    return model.eval()


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# what a diffusers VQModel's config must say for it to be taming's network under other names
DIFFUSERS_REQUIRED = {"_class_name": "VQModel", "act_fn": "silu", "norm_type": "group", "in_channels": 3,
                      "out_channels": 3}


def _diffusers_config(path: Path) -> VQGANConfig:
    try:
        config = json.loads(path.read_text())
        widths = [int(width) for width in config["block_out_channels"]]
        wrong = {key: config.get(key, "(absent)") for key, value in DIFFUSERS_REQUIRED.items()
                 if config.get(key, value if key != "_class_name" else None) != value}
        blocks = set(config.get("down_block_types", [])) | set(config.get("up_block_types", []))
        if blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            wrong["block types"] = sorted(blocks)
        if any(width % widths[0] for width in widths):
            wrong["block_out_channels"] = widths
        if wrong:
            raise ValueError(f"not a VQModel this reader builds: {wrong}")
        latent = int(config["latent_channels"])
        return VQGANConfig(resolution=int(config.get("sample_size", 32)), image_size=int(config.get("sample_size", 32)),
                           ch=widths[0], ch_mult=tuple(width // widths[0] for width in widths),
                           num_res_blocks=int(config["layers_per_block"]), attn_resolutions=(), z_channels=latent,
                           embed_dim=int(config.get("vq_embed_dim") or latent),
                           codebook_size=int(config["num_vq_embeddings"]), distance="cdist",
                           mid_attention=bool(config.get("mid_block_add_attention", True)),
                           norm_groups=int(config.get("norm_num_groups", 32)))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def _taming_name(key: str, levels: int) -> str:
    """A diffusers VQModel parameter's name in taming's layout (the VQGAN's)."""
    parts = key.split(".")
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        inner = ".".join(parts[3:])
        inner = inner.replace("resnets.", "block.", 1).replace("conv_shortcut", "nin_shortcut")
        inner = inner.replace("downsamplers.0.", "downsample.").replace("upsamplers.0.", "upsample.")
        return f"{parts[0]}.{'down' if parts[1] == 'down_blocks' else 'up'}.{level}.{inner}"
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
    for theirs, ours in ((".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                         (".to_out.0.", ".proj_out."), (".conv_norm_out.", ".norm_out.")):
        key = key.replace(theirs, ours)
    return key


def load_diffusers(folder: str | Path, image_size: int) -> VQGAN:
    """A diffusers `VQModel` (aMUSEd's VQ) from its folder (config.json, diffusion_pytorch_model.safetensors,
    or the .bin, read as tensors only), at `image_size`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _diffusers_config(folder / "config.json")
    weights_file = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{folder}: a diffusers VQModel needs one of {DIFFUSERS_WEIGHTS}")
    if weights_file.suffix == ".safetensors":
        try:
            state = load_file(str(weights_file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights_file}: not a readable safetensors file ({error})") from error
    else:
        state = restricted_pickle.load(weights_file, lambda module, name: None)
    renamed = {_taming_name(key, len(cfg.ch_mult)): value for key, value in state.items()}
    attention = [key for key in renamed if ".attn_1." in key and key.endswith("weight") and renamed[key].dim() == 2
                 and not key.endswith("norm.weight")]
    for key in attention:  # a Linear's (C, C) as the 1x1 conv's (C, C, 1, 1)
        renamed[key] = renamed[key][:, :, None, None]
    return _load_vqgan_weights(cfg, image_size, renamed, weights_file, f"VQModel {folder / 'config.json'} describes")


def load(pretrained: PretrainedTokenizer, image_size: int) -> ImageTokenizer:
    """The tokenizer `pretrained` names, at `image_size`, in eval mode; every file checked."""
    if pretrained.kind == "openai":
        return load_openai(pretrained.path, image_size)
    if pretrained.kind == "diffusers":
        return load_diffusers(pretrained.path, image_size)
    return load_taming(pretrained.path, pretrained.config, image_size)
