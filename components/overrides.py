"""The flow's typed `overrides` parameter, derived from the stage configs of `config.py`.

`PipelineOverrides` has every field of `PipelineConfig` (but `preset`) nested per stage, with its
type, constraints and description, each optional: None keeps the preset's (or the retrained
model's) value. Prefect turns it into the deployment's parameter form and validates runs
against its JSON schema; `config.resolve` applies it through its `dotted()` fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, create_model,
                      model_serializer, model_validator)

from .config import (ClipConfig, ConfigError, CorpusConfig, DataConfig, DownloadConfig, DVAEConfig, DVAEOptimConfig,
                     FilterConfig, OptimConfig, PipelineConfig, PriorConfig, SampleConfig, StageConfig, TokenizerConfig,
                     merge_trees, parse_override, validation_problems)

class Overrides(BaseModel):
    """Base of the override models derived from the stage configs (see `overrides_model`): every
    field is optional and None keeps the preset's (or the base config's) value; unknown fields are
    errors. Dotted keys ({"prior.optim.steps": 300}, the `resolve` and CLI form) are read as the
    nested form, so Python callers of the flow may pass either; a deployment's form and the
    Prefect server take the nested form only, as the JSON schema says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _nest_dotted_keys(cls, data: Any) -> Any:
        if data is None:  # an absent section, or `overrides=None`: nothing to change
            return {}
        if not isinstance(data, dict) or not any(isinstance(key, str) and "." in key for key in data):
            return data
        nested: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(key, str) and "." in key:
                if value is None:  # in `resolve`'s dotted dicts None is a value; here it would mean "keep"
                    raise ConfigError(f"{key}: None means 'keep the preset's value' in the flow's overrides, "
                                      "so a field cannot be set to None through them")
                key, *inner = key.split(".")
                for part in reversed(inner):
                    value = {part: value}
            nested = merge_trees(nested, {key: value})
        return nested

    @model_serializer(mode="wrap")
    def _dump_changes_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a run's parameters (Prefect UI, logs) show what was changed, not ~130 None fields
        return {key: value for key, value in handler(self).items() if value is not None and value != {}}

    def __repr_args__(self):
        return [(key, value) for key, value in super().__repr_args__()
                if value is not None and not (isinstance(value, Overrides) and not value.dotted())]

    def dotted(self) -> dict[str, Any]:
        """The fields set (not None), as `resolve`'s dotted dict: {"prior.optim.steps": 300}."""
        found: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Overrides):
                found.update({f"{name}.{key}": inner for key, inner in value.dotted().items()})
            elif value is not None:
                found[name] = value
        return found


_OVERRIDE_MODELS: dict[type[StageConfig], type[Overrides]] = {}


def overrides_model(config: type[StageConfig], exclude: tuple[str, ...] = ()) -> type[Overrides]:
    """`<Stage>Overrides`: the fields of `config` with their types, constraints and descriptions,
    each optional (default None); a nested stage config becomes a nested override model. Built from
    the configs, so a deployment's parameter form never drifts from them. Cross-field checks
    (heads divide d_model, ...) stay on the configs and run in `resolve`."""
    if config in _OVERRIDE_MODELS:
        return _OVERRIDE_MODELS[config]
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        if name in exclude:
            continue
        if isinstance(info.annotation, type) and issubclass(info.annotation, StageConfig):
            section = overrides_model(info.annotation)
            fields[name] = (section, Field(section(), description=info.description or
                                           f"{name} settings to change; the others keep the preset's values"))
        else:
            typed = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[name] = (typed | None, Field(None, description=info.description))
    doc = f"Fields of {config.__name__} to change; None keeps the preset's (or the retrained model's) value."
    model = create_model(config.__name__.removesuffix("Config") + "Overrides", __base__=Overrides,
                         __module__=__name__, __doc__=doc, **fields)
    _OVERRIDE_MODELS[config] = model
    return model


# Module-level names, so each model pickles and Prefect's schema names its definitions after them.
OptimOverrides = overrides_model(OptimConfig)
DVAEOptimOverrides = overrides_model(DVAEOptimConfig)
DataOverrides = overrides_model(DataConfig)
CorpusOverrides = overrides_model(CorpusConfig)
DownloadOverrides = overrides_model(DownloadConfig)
FilterOverrides = overrides_model(FilterConfig)
TokenizerOverrides = overrides_model(TokenizerConfig)
DVAEOverrides = overrides_model(DVAEConfig)
PriorOverrides = overrides_model(PriorConfig)
ClipOverrides = overrides_model(ClipConfig)
SampleOverrides = overrides_model(SampleConfig)
# `preset` is the flow's own parameter, not an override
PipelineOverrides = overrides_model(PipelineConfig, exclude=("preset",))


def as_overrides(overrides: Overrides | dict[str, Any] | list[str] | None) -> PipelineOverrides:
    """The flow's `overrides` parameter from any form `resolve` takes; a bad one raises ConfigError."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    try:
        return PipelineOverrides.model_validate(overrides)
    except ValidationError as err:
        raise ConfigError(f"invalid overrides: {validation_problems(err, 'overrides')}") from None
