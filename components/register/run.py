"""Stage 10: log the bundle as the MLflow pyfunc model `dalle`, register it, and move the `champion`
alias to the new version only when its primary metric beats the champion's on the same evaluation set.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlflow.pyfunc

from ..config import PipelineConfig
from ..evaluate import headline_metrics
from ..tracking import Tracker, fluent_store

MODEL_NAME = "dalle"
CHAMPION = "champion"
PRIMARY_METRICS = ("oracle_colour_reranked", "clip_score_reranked")  # first one present decides; higher wins
# the pyfunc's request columns besides `prompt`, with their MLflow types; every one may be left out
OPTION_COLUMNS = {"num_images": "long", "seed": "long", "temperature": "double", "top_k": "long", "top_p": "double",
                  "guidance_scale": "double", "prefix_rows": "long", "image_png": "string"}
OUTPUT_COLUMNS = {"prompt": "string", "rank": "long", "clip_score": "double", "image_png": "string"}


class DallePyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with `prompt` and optional `num_images`, `seed`, `temperature`, `top_k`, `top_p`,
    `guidance_scale`, `prefix_rows` (taken from the first row), and `image_png` (base64 PNG, every row
    or none): image-to-image, its top `prefix_rows` token rows kept (default half). Output: one row per
    image with the prompt, the image's rank, its CLIP score and the PNG as base64."""

    def load_context(self, context) -> None:
        from .bundle import Bundle

        self.bundle = Bundle.load(context.artifacts["bundle"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from .bundle import png_base64, png_from_base64

        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
        # options come from the first row; a column left empty (NaN) means the default
        first = {key: value for key, value in model_input.iloc[0].to_dict().items() if pd.notna(value)}
        options = {key: first[key] for key in ("temperature", "top_k", "top_p", "guidance_scale") if key in first}
        num_images, seed = int(first.get("num_images", 1)), int(first.get("seed", 0))
        prompts = [str(p) for p in model_input["prompt"]]
        given = None
        if "image_png" in model_input.columns:
            missing = [i for i, value in enumerate(model_input["image_png"]) if not isinstance(value, str) or not value]
            if missing:
                raise ValueError(f"image_png is empty in rows {missing}: give every row an image, or none")
            given = [png_from_base64(value, f"image_png of row {i}") for i, value in enumerate(model_input["image_png"])]
        prefix_rows = int(first["prefix_rows"]) if "prefix_rows" in first else None
        images, scores = self.bundle.generate(prompts, num_images=num_images, seed=seed, image=given,
                                              prefix_rows=prefix_rows, **options)
        rows = [
            {"prompt": prompt, "rank": rank, "clip_score": float(scores[p, rank]), "image_png": png_base64(images[p, rank])}
            for p, prompt in enumerate(prompts) for rank in range(num_images)
        ]
        return pd.DataFrame(rows)


def model_signature():
    """The request and response columns of `DallePyfunc`, as serving validates requests against them.

    `prompt` is marked optional too: a request without it then reaches `predict`, whose error names
    the column it needs (MLflow's own would say only that an input is missing)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = [ColSpec("string", "prompt", required=False),
              *(ColSpec(kind, name, required=False) for name, kind in OPTION_COLUMNS.items())]
    outputs = [ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def model_requirements() -> list[str]:
    """What a serving environment installs to load the model: this project (which brings torch and the
    rest) and the versions of MLflow and cloudpickle that wrote it, as this environment has them."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("dalle-pipeline", "mlflow", "cloudpickle")]


def input_example(prompts: list[str]):
    """A request of one evaluation prompt and nothing else: every option takes the bundle's default."""
    import pandas as pd

    return pd.DataFrame({"prompt": prompts[:1]}) if prompts else None


def version_description(metrics: dict[str, float], prompts: list[str], data_tags: dict[str, str]) -> str:
    """What a registered version was trained on, what it was judged on and how it scored, for the registry page."""
    name, value = primary_metric(metrics)
    headline = ", ".join(f"{key} {value:.4f}" for key, value in headline_metrics(metrics).items() if key != name)
    data = data_tags.get("data_source", "unknown data")
    digest = data_tags.get("data_digest")
    return (f"Trained on {data}" + (f" (data digest {digest})" if digest else " (no data digest recorded)") + ". "
            f"Judged on evaluation set {evaluation_fingerprint(prompts)} ({len(prompts)} prompts): "
            f"{name} {value:.4f} (the primary metric)" + (f"; {headline}" if headline else "") + ".")


def primary_metric(metrics: dict[str, float]) -> tuple[str, float]:
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    raise ValueError(f"no primary metric among {PRIMARY_METRICS} in {sorted(metrics)}")


def evaluation_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Registration:
    version: str
    promoted: bool
    decision: str

    @property
    def metrics(self) -> dict[str, float]:
        return {}

    TAGS: ClassVar = ("decision", "version")  # what a stage's run shows of its result (flows/stages.py: show_result)


@dataclass(frozen=True)
class FetchedBundle:
    """A registered model's bundle, downloaded: what a retrain starts from."""

    bundle_dir: Path
    version: str

    @property
    def metrics(self) -> dict[str, float]:
        return {}


def register_version(bundle_dir: Path, metrics: dict[str, float], prompts: list[str], tracker: Tracker,
                     data_tags: dict[str, str] | None = None) -> Registration:
    """Log + register the bundle under `tracker`'s run (its version tagged with `data_tags`: what it was
    trained on), then decide champion/challenger."""
    name, value = primary_metric(metrics)
    fingerprint = evaluation_fingerprint(prompts)
    version = tracker.log_registered_pyfunc(MODEL_NAME, DallePyfunc(), {"bundle": str(bundle_dir)},
                                            signature=model_signature(), input_example=input_example(prompts),
                                            pip_requirements=model_requirements())
    client = tracker.client
    client.update_model_version(MODEL_NAME, version, description=version_description(metrics, prompts, data_tags or {}))
    tags = {"primary_metric": name, "primary_value": value, "evaluation_set": fingerprint, **(data_tags or {})}
    for key, tag in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, key, str(tag))

    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except Exception:  # no champion yet
        champion = None
    if champion is None:
        promoted, decision = True, f"no champion yet: version {version} becomes champion ({name}={value:.4f})"
    elif champion.tags.get("evaluation_set") != fingerprint or champion.tags.get("primary_metric") != name:
        promoted, decision = False, (f"champion v{champion.version} was evaluated on another set or metric; "
                                     f"kept (challenger v{version}: {name}={value:.4f})")
    else:
        best = float(champion.tags["primary_value"])
        promoted = value > best
        verb = "beats" if promoted else "does not beat"
        decision = f"challenger v{version} {name}={value:.4f} {verb} champion v{champion.version} {best:.4f}"
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    client.set_model_version_tag(MODEL_NAME, version, "champion_decision", decision)
    tracker.set_tags({"champion_decision": decision, "model_version": version})
    tracker.log_metrics({"promoted": float(promoted)})
    print(decision, flush=True)
    return Registration(version=version, promoted=promoted, decision=decision)


def run(cfg: PipelineConfig, dvae_dir: Path, prior_dir: Path, tokenizer_path: Path, clip_source: str,
        metrics: dict[str, float], prompts: list[str], parent: Tracker, out_dir: Path,
        evaluation_ids: list[str] | None = None, data_digest: str | None = None) -> Registration:
    """The stage's entry point: the bundle built in `out_dir/bundle`, logged as the model of the
    pipeline's `parent` run (beside the metrics it is judged by), registered and judged; its version
    is tagged with the data (`data_source`, `data_digest` of the curated training samples)."""
    from .bundle import build

    bundle_dir = build(Path(out_dir) / "bundle", cfg, dvae_dir, prior_dir, tokenizer_path, clip_source,
                       evaluation_ids)
    data_tags = {"data_source": cfg.data.source or "shapes corpus",
                 **({"data_digest": data_digest} if data_digest else {})}
    return register_version(bundle_dir, metrics, prompts, parent, data_tags)


def resolve_version(model_uri: str, tracker: Tracker) -> str:
    """The version number behind `models:/<name>@<alias>` or `models:/<name>/<n>`."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if match is None:
        raise ValueError(f"{model_uri!r} is not a registered model URI (models:/<name>@<alias> or models:/<name>/<n>)")
    name, alias, number = match.groups()
    if number is not None:
        return number
    try:
        return str(tracker.client.get_model_version_by_alias(name, alias).version)
    except Exception as err:  # MLflow raises RestException / MlflowException for a missing alias
        raise ValueError(f"{model_uri}: no version of {name!r} has alias {alias!r} in {tracker.tracking_uri}") from err


def fetch_bundle(model_uri: str, store: Tracker, out_dir: Path) -> FetchedBundle:
    """Download the bundle of a version of a registered `dalle` model (`models:/<name>/<n>`) from `store`'s
    registry into `out_dir`."""
    from mlflow.artifacts import download_artifacts

    from .bundle import CONFIG_FILE

    with fluent_store(store.tracking_uri):
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(out_dir)))
    found = sorted(local.rglob(CONFIG_FILE))
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no dalle bundle ({CONFIG_FILE} not found under {local})")
    return FetchedBundle(found[0].parent, version=model_uri.rsplit("/", 1)[-1])
