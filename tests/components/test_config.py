import pickle
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from dalle_pipeline.components import overrides as overrides_module
from dalle_pipeline.components.config import ConfigError, PipelineConfig, resolve
from dalle_pipeline.components.presets import PRESETS
from dalle_pipeline.components.overrides import PipelineOverrides, as_overrides
from dalle_pipeline.components.saved_configs import upgrade


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    cfg = resolve(preset)
    assert cfg.preset == preset
    assert cfg.dvae.pretrained is not None or cfg.corpus.image_size % cfg.dvae.downsample == 0
    if cfg.clip.pretrained is not None and not Path(cfg.clip.pretrained).suffix:  # a tag open_clip knows the model by
        import open_clip

        assert cfg.clip.pretrained in open_clip.list_pretrained_tags_by_model(cfg.clip.model_name)


def test_the_one_gpu_preset_is_a_pretrained_f16_tokenizer_at_256_px_and_a_prior_of_100_to_300m():
    import torch

    from dalle_pipeline.components.prior.model import Prior, PriorModelConfig

    cfg = resolve("one-gpu")
    assert cfg.dvae.pretrained.kind == "taming" and cfg.dvae.optim.steps == 0 and cfg.corpus.image_size == 256
    assert cfg.dvae.pretrained.path.startswith(str(Path.home()))  # ~ expanded, so stage keys digest the file
    architecture = cfg.prior.model_dump(include=set(PriorModelConfig.model_fields))
    with torch.device("meta"):  # the f16 VQGAN's 16x16 grid of 16384 codes
        prior = Prior(PriorModelConfig(**architecture, text_vocab=cfg.tokenizer.vocab_size, image_vocab=16384,
                                       text_len=cfg.tokenizer.text_len, grid_size=16))
    assert 100e6 <= sum(p.numel() for p in prior.parameters()) <= 300e6
    # the tokenizer's files moved: one dotted field, and the preset itself stays as it was
    moved = resolve("one-gpu", ["dvae.pretrained.path=/data/vqgan/last.ckpt"])
    assert moved.dvae.pretrained.path == "/data/vqgan/last.ckpt" and moved.dvae.pretrained.kind == "taming"
    assert resolve("one-gpu").dvae.pretrained == cfg.dvae.pretrained


def test_overrides_reach_nested_fields_and_keep_section_defaults():
    cfg = resolve("tiny", ["prior.layers=6", "prior.optim.lr=0.01", "sample.top_k=0"])
    assert cfg.prior.layers == 6
    assert cfg.prior.optim.lr == 0.01
    # the rest of prior.optim keeps the prior's own defaults, not OptimConfig's
    assert cfg.prior.optim.weight_decay == resolve("tiny").prior.optim.weight_decay
    assert cfg.sample.top_k == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"prior.layerz": 3}, "prior.layerz"),
        ({"prior.d_model": 130, "prior.heads": 4}, "prior"),
        ({"corpus.image_size": 30}, "corpus.image_size"),
        ({"sample.keep": 20, "sample.candidates": 4}, "keep"),
        ({"dvae.optim.lr": -1}, "dvae.optim.lr"),
        ({"dvae.optim.ema_decay": 0.99}, "dvae.optim.ema_decay 0.99 with dvae.quantizer vq"),
    ],
)
def test_bad_values_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve("tiny", overrides)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="'huge'"):
        resolve("huge")


def test_override_strings_need_an_equals_sign():
    with pytest.raises(ConfigError, match="field.path=value"):
        resolve("tiny", ["prior.layers"])


# The flow's `overrides` parameter: PipelineOverrides, derived from the stage configs.


def _leaf_fields(model, prefix=""):
    """{dotted name: FieldInfo} of every leaf field of a config or overrides model."""
    found = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found.update(_leaf_fields(info.annotation, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = info
    return found


def test_overrides_model_has_every_config_field_with_its_description():
    configs, overrides = _leaf_fields(PipelineConfig), _leaf_fields(PipelineOverrides)
    assert set(overrides) == set(configs) - {"preset"}  # the preset is the flow's own parameter
    assert all(overrides[name].description == configs[name].description for name in overrides)
    assert all(info.default is None for info in overrides.values())
    # each generated model is a module-level class of its own name (pickles, names its schema definition)
    section = PipelineOverrides.model_fields["prior"].annotation.model_fields["optim"].annotation
    assert section is overrides_module.OptimOverrides and section.__name__ == "OptimOverrides"
    assert pickle.loads(pickle.dumps(as_overrides(["prior.optim.steps=3"]))) == as_overrides(["prior.optim.steps=3"])


def test_nested_overrides_apply_and_equal_the_dotted_and_cli_forms():
    nested = PipelineOverrides(seed=3, prior={"layers": 3, "optim": {"steps": 300}}, sample={"top_k": 0})
    cfg = resolve("micro", nested)
    assert (cfg.seed, cfg.prior.layers, cfg.prior.optim.steps, cfg.sample.top_k) == (3, 3, 300, 0)
    assert cfg == resolve("micro", {"seed": 3, "prior.layers": 3, "prior.optim.steps": 300, "sample.top_k": 0})
    assert cfg == resolve("micro", ["seed=3", "prior.layers=3", "prior.optim.steps=300", "sample.top_k=0"])
    # the flow's parameter built from the dotted or CLI form is the same model, dumped as the changes only
    assert as_overrides({"prior.optim.steps": 300, "prior": {"layers": 3}, "seed": 3, "sample.top_k": 0}) == nested
    assert nested.model_dump(mode="json") == {"seed": 3, "prior": {"layers": 3, "optim": {"steps": 300}},
                                              "sample": {"top_k": 0}}


def test_none_fields_keep_the_preset_and_the_base_config():
    untouched = PipelineOverrides.model_validate({"prior": {"layers": None, "optim": {"steps": None}}, "clip": None})
    assert untouched.dotted() == {}
    assert resolve("small", untouched) == resolve("small")
    # retraining: the base (a trained model's config) keeps every field the overrides leave at None
    base = resolve("small").model_dump(mode="json")
    retrained = resolve("tiny", PipelineOverrides(prior={"optim": {"steps": 300}}), base=base)
    assert retrained.prior.optim.steps == 300
    assert retrained.prior.layers == 12 and retrained.clip.embed_dim == 256


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"prior": {"optim": {"steps": "many"}}}, "prior.optim.steps"),
        ({"prior": {"optim": {"steps": 0}}}, "prior.optim.steps"),
        ({"prior": {"layerz": 3}}, "prior.layerz"),
        ({"sample": {"top_p": 2}}, "sample.top_p"),
        ({"prior": {"attention": "sparse"}}, "prior.attention"),
        ({"data.source": None}, "data.source"),  # dotted None meant "set to None": refused, not ignored
    ],
)
def test_bad_overrides_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        as_overrides(overrides)
    with pytest.raises(ValidationError):
        PipelineOverrides.model_validate(overrides)


def test_cross_field_checks_of_the_configs_still_apply_to_nested_overrides():
    with pytest.raises(ConfigError, match=r"prior: .*d_model \(130\)"):
        resolve("tiny", PipelineOverrides(prior={"d_model": 130}))


def test_a_vq_dvae_saved_with_a_weight_average_fine_tunes_without_one():
    # before vq refused ema_decay > 0, tiny saved vq with 0.99: its bundle's config must still resolve
    saved = resolve("tiny").model_dump(mode="json")
    saved["dvae"]["optim"]["ema_decay"] = 0.99
    cfg = resolve(base=upgrade(saved))
    assert cfg.dvae.quantizer == "vq" and cfg.dvae.optim.ema_decay == 0.0
    # the paper's gumbel dVAE keeps its average
    assert resolve(base=upgrade(resolve("paper").model_dump(mode="json"))).dvae.optim.ema_decay == 0.999


def test_a_config_saved_when_the_zero_shot_pairs_were_called_holdout_keeps_its_pairs():
    saved = resolve("tiny").model_dump(mode="json")
    saved["corpus"]["holdout"] = saved["corpus"].pop("zero_shot_pairs")[:1]  # as bundles registered before the rename
    assert resolve(base=upgrade(saved)).corpus.zero_shot_pairs == [("red", "triangle")]
