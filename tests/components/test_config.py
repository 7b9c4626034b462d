import pytest

from dalle_pipeline.components.config import PRESETS, ConfigError, resolve


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    cfg = resolve(preset)
    assert cfg.preset == preset
    assert cfg.corpus.image_size % cfg.downsample == 0


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
