"""The `train-dalle` flow's parameters as Prefect sees them: the JSON schema behind a deployment's
form, the server's check of a run's parameters against it, and the flow's own validation.

No server: `validate` is the function the Prefect server calls on a deployment's schema when a run
is created (`create_flow_run_from_deployment`); tests/flows/test_served_deployment.py checks the
same refusal through `prefect deployment run` on a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, validate

from dalle_pipeline.components.config import resolve
from dalle_pipeline.components.overrides import PipelineOverrides
from dalle_pipeline.flows.train_dalle import train_dalle

REPO = Path(__file__).resolve().parents[2]
STAGES = ["data", "corpus", "download", "filter", "tokenizer", "dvae", "prior", "clip", "sample"]


@pytest.fixture(scope="module")
def schema() -> dict:
    """What `prefect deploy` stores on the deployment (see prefect/cli/deploy/_core.py)."""
    return parameter_schema(train_dalle).model_dump(exclude_unset=True)


def test_schema_shows_every_stage_nested_with_typed_documented_fields(schema):
    definitions = schema["definitions"]
    assert schema["properties"]["overrides"]["$ref"] == "#/definitions/PipelineOverrides"
    overrides = definitions["PipelineOverrides"]
    assert set(STAGES) <= set(overrides["properties"]) and "preset" not in overrides["properties"]
    assert overrides["additionalProperties"] is False
    prior = definitions["PriorOverrides"]
    assert prior["properties"]["optim"]["$ref"] == "#/definitions/OptimOverrides"
    steps = definitions["OptimOverrides"]["properties"]["steps"]
    assert steps["description"] == "optimizer updates"
    assert {"type": "integer", "minimum": 1} in steps["anyOf"] and steps["default"] is None
    assert {"enum": ["dalle", "dense"], "type": "string"} in prior["properties"]["attention"]["anyOf"]
    data = definitions["DataOverrides"]["properties"]  # your data, in the deployment's form
    assert data["source"]["description"].startswith("your data: a URL list, a folder of captioned images")
    assert {"enum": ["auto", "url_list", "folder", "webdataset", "parquet", "coco"], "type": "string"} in \
        data["format"]["anyOf"]
    # every field of every stage carries its config's one-line doc into the form
    undocumented = [f"{name}.{field}" for name, definition in definitions.items() if name.endswith("Overrides")
                    for field, prop in definition["properties"].items() if not prop.get("description")]
    assert undocumented == []


@pytest.mark.parametrize(
    "overrides, field, reason",
    [
        ({"prior": {"optim": {"steps": "many"}}}, "overrides.prior.optim.steps", "'many'"),
        ({"prior": {"optim": {"steps": 0}}}, "overrides.prior.optim.steps", "minimum of 1"),
        ({"prior": {"layerz": 3}}, "overrides.prior", "'layerz' was unexpected"),
        ({"prior": {"attention": "sparse"}}, "overrides.prior.attention", "'sparse'"),
        # the dotted form is for Python callers and the CLI; a deployment run takes the nested form
        ({"prior.optim.steps": 300}, "overrides", "'prior.optim.steps' was unexpected"),
    ],
)
def test_prefects_server_validation_refuses_a_bad_override_naming_it(schema, overrides, field, reason):
    with pytest.raises(ValidationError, match=f"field '{field}'.*{reason}"):
        validate({"preset": "micro", "overrides": overrides}, schema, raise_on_error=True)


def test_prefect_yaml_deployment_parameters_fit_the_schema_and_retrain_keeps_300_prior_steps(schema):
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                   if d["entrypoint"] == "flows/train_dalle.py:train_dalle"}
    assert set(deployments) == {"full", "retrain"}
    for deployment in deployments.values():  # as the server checks them on `prefect deploy`
        validate(deployment["parameters"], schema, raise_on_error=True, ignore_required=True)
    retrain = train_dalle.validate_parameters(deployments["retrain"]["parameters"])
    assert retrain["overrides"].dotted() == {"prior.optim.steps": 300}
    assert resolve("micro", retrain["overrides"]).prior.optim.steps == 300


def test_the_flow_takes_the_nested_form_the_dotted_form_and_none():
    def received(overrides):
        return train_dalle.validate_parameters({"preset": "micro", "overrides": overrides})["overrides"]

    nested = received({"prior": {"optim": {"steps": 300}}})
    assert isinstance(nested, PipelineOverrides)
    assert received({"prior.optim.steps": 300}) == nested == PipelineOverrides(prior={"optim": {"steps": 300}})
    assert received(None) == received({}) == PipelineOverrides()
    with pytest.raises(ParameterTypeError, match=r"overrides\.prior\.optim\.steps"):
        received({"prior": {"optim": {"steps": "many"}}})
