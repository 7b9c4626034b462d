"""The `train-dalle` flow: every stage of DESIGN.md, each a thin task around one component's `run`.

Imports are absolute: Prefect loads a deployment's entrypoint as a script by its file path, where
relative imports fail. Tasks take and return stage records (paths, ids, summary metrics), never
tensors. Each opens a nested MLflow run under the flow's parent run (tagged with the Prefect flow
run id), so the MLflow UI shows one run per pipeline execution with one child per stage; a stage
whose inputs are unchanged is reused from `<root>/stages/` and its child run says so (`cache` tag).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from dalle_pipeline.components import config as config_module
from dalle_pipeline.components.cluster import disconnect
from dalle_pipeline.components.config import PipelineConfig, PresetName
from dalle_pipeline.components.overrides import PipelineOverrides
from dalle_pipeline.components.stage_cache import StageCache
from dalle_pipeline.components.storage import file_sha256
from dalle_pipeline.components.tracking import Tracker, default_root, default_tracking_uri, stage_run

STAGE_TASK = {"cache_policy": NO_CACHE}  # our StageCache decides what to skip; Prefect's input cache would not log it
# stages that fetch over the network retry: each is idempotent (a download resumes its batch)
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 10}
StageName = Literal["corpus", "url-list", "download", "filter", "text-tokenizer", "dvae", "tokenize-corpus", "prior",
                    "clip", "sample", "evaluate", "register", "base-model", "all"]
Record = dict[str, Any]  # a finished stage: key, outputs, metrics, mlflow_run_id (see stage_cache)


@dataclass(frozen=True)
class Stages:
    """What every stage task needs besides its inputs: the parent MLflow run and the stage cache."""

    parent: Tracker
    cache: StageCache
    rerun: frozenset[str] = frozenset()  # stage names to run even when cached; "all" for every stage


def run_stage(stages: Stages, name: str, config: dict[str, Any], inputs: dict[str, Record], code: tuple[str, ...],
              build: Callable[[Path, Tracker], tuple[dict[str, Any], dict[str, float]]],
              folder_config: dict[str, Any] | None = None) -> Record:
    """Run `build(folder, tracker) -> (outputs, metrics)` in a nested MLflow run, unless the stage
    already finished with the same key: then log that it was reused (tags `cache`, `built_by_run`,
    its metrics again) and return its record. `folder_config` names the folder of a stage that
    accumulates (by settings and source, not by inputs); by default the folder is the key's."""
    key = stages.cache.key(name, config, {input_name: record["key"] for input_name, record in inputs.items()}, code)
    folder_key = key if folder_config is None else stages.cache.key(name, folder_config, {}, code)
    folder = stages.cache.folder(name, folder_key)
    started = time.perf_counter()
    with stage_run(stages.parent, name, config) as tracker:
        forced = name in stages.rerun or "all" in stages.rerun
        record = None if forced else stages.cache.lookup(folder, key)
        if record is not None:
            tracker.set_tags({"cache": "hit", "cache_key": key, "built_by_run": record["mlflow_run_id"],
                              "stage_dir": str(folder)})
            tracker.log_metrics(record["metrics"])
            print(f"{name}: inputs unchanged, reusing {folder} (built by MLflow run {record['mlflow_run_id']})")
            return {**record, "reused": True, "seconds": time.perf_counter() - started}
        tracker.set_tags({"cache": "forced" if forced else "miss", "cache_key": key, "stage_dir": str(folder)})
        if forced:
            shutil.rmtree(folder, ignore_errors=True)  # from scratch: no resuming from the last build's checkpoints
        folder.mkdir(parents=True, exist_ok=True)  # an unfinished folder is kept: stages resume from it
        outputs, metrics = build(folder, tracker)
        seconds = time.perf_counter() - started
        record = stages.cache.commit(folder, name, key, {"outputs": outputs, "metrics": metrics,
                                                         "mlflow_run_id": tracker.run_id, "finished": time.time(),
                                                         "build_seconds": seconds})
        return {**record, "reused": False, "seconds": seconds}


@task(name="corpus", **STAGE_TASK)
def make_corpus(cfg: PipelineConfig, stages: Stages) -> Record:
    """The embedded shapes corpus, or your URL list (`download.url_list`), as the URL list to download."""
    if cfg.download.url_list is not None:
        url_list = Path(cfg.download.url_list).resolve()
        if not url_list.is_file():
            raise FileNotFoundError(f"download.url_list {url_list} does not exist")
        config = {"url_list": str(url_list), "sha256": file_sha256(url_list)}
        return run_stage(stages, "url-list", config, {}, (), lambda folder, tracker: ({"url_list": str(url_list)}, {}))

    from dalle_pipeline.components.corpus import generate

    def build(folder: Path, tracker: Tracker):
        result = generate(cfg.corpus, folder)
        tracker.log_metrics({"num_images": result.num_images})
        return {"url_list": str(result.url_list)}, {"num_images": result.num_images}

    return run_stage(stages, "corpus", cfg.corpus.model_dump(mode="json"), {}, ("corpus",), build)


@task(name="download", **IO_RETRIES, **STAGE_TASK)
def download(cfg: PipelineConfig, corpus: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.download.run import run

    def build(folder: Path, tracker: Tracker):
        result = run(cfg.download, corpus["outputs"]["url_list"], folder, image_size=cfg.corpus.image_size)
        metrics = {"successes": result.successes, "failures": result.failures, "new_urls": result.new_urls,
                   **{f"failed_{k}": v for k, v in result.failures_by_reason.items()}}
        tracker.log_metrics(metrics)
        print(f"downloaded {result.successes} images ({result.new_urls} URLs new), {result.failures} failed "
              f"{result.failures_by_reason}")
        return {"shards_dir": str(result.shards_dir)}, metrics

    config = {**cfg.download.model_dump(mode="json"), "image_size": cfg.corpus.image_size}
    # one folder per URL list location and settings: a list that grows downloads only its new rows
    folder_config = {**config, "url_list": corpus["outputs"]["url_list"]}
    return run_stage(stages, "download", config, {"corpus": corpus}, ("download",), build, folder_config)


@task(name="filter", **STAGE_TASK)
def filter_corpus(cfg: PipelineConfig, downloaded: Record, stages: Stages) -> Record:
    from prefect.artifacts import create_table_artifact

    from dalle_pipeline.components.filter.run import run

    def build(folder: Path, tracker: Tracker):
        result = run(cfg.filter, downloaded["outputs"]["shards_dir"], folder)
        metrics = {"kept": result.kept, **{f"dropped_{k}": v for k, v in result.dropped_by_reason.items()}}
        tracker.log_metrics(metrics)
        tracker.log_artifact(result.report_path)
        print(f"kept {result.kept} samples, dropped {result.dropped_by_reason}")
        rows = [{"stage": "filter", "reason": "kept", "samples": result.kept}]
        rows += [{"stage": "filter", "reason": k, "samples": v} for k, v in result.dropped_by_reason.items()]
        rows += [{"stage": "download", "reason": k, "samples": v} for k, v in result.download_failures_by_reason.items()]
        return {"curated_dir": str(result.curated_dir), "report_rows": rows}, metrics

    config = cfg.filter.model_dump(mode="json")
    record = run_stage(stages, "filter", config, {"download": downloaded}, ("filter", "download", "clip"), build,
                       folder_config={**config, "source": downloaded["outputs"]["shards_dir"]})
    create_table_artifact(record["outputs"]["report_rows"], key="filter-report",
                          description="Samples kept and dropped, by reason")
    return record


@task(name="text-tokenizer", **STAGE_TASK)
def train_text_tokenizer(cfg: PipelineConfig, curated: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.shards import iter_samples
    from dalle_pipeline.components.text.tokenizer import run

    def build(folder: Path, tracker: Tracker):
        captions = [sample.caption for sample in iter_samples(curated["outputs"]["curated_dir"])]
        path, digest = run(cfg.tokenizer, captions, folder)
        tracker.set_tags({"tokenizer_hash": digest})
        tracker.log_artifact(path)
        return {"tokenizer_path": str(path), "tokenizer_hash": digest}, {}

    return run_stage(stages, "text-tokenizer", cfg.tokenizer.model_dump(mode="json"), {"filter": curated},
                     ("text",), build)


@task(name="dvae", **STAGE_TASK)
def train_dvae(cfg: PipelineConfig, curated: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.dvae.train import run

    def build(folder: Path, tracker: Tracker):
        result = run(cfg.dvae, curated["outputs"]["curated_dir"], folder, cfg.corpus.image_size, cfg.seed, tracker)
        return {"checkpoint_dir": str(result.checkpoint_dir)}, result.metrics

    config = {**cfg.dvae.model_dump(mode="json"), "image_size": cfg.corpus.image_size, "seed": cfg.seed}
    return run_stage(stages, "dvae", config, {"filter": curated}, ("dvae", "training", "cluster.py"), build)


@task(name="tokenize-corpus", **STAGE_TASK)
def tokenize_corpus(cfg: PipelineConfig, curated: Record, dvae: Record, tokenizer: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.tokenize_corpus.run import run

    def build(folder: Path, tracker: Tracker):
        result = run(curated["outputs"]["curated_dir"], dvae["outputs"]["checkpoint_dir"],
                     tokenizer["outputs"]["tokenizer_path"], folder, cfg.tokenizer.text_len,
                     bpe_dropout=cfg.tokenizer.bpe_dropout)
        tracker.log_metrics({"rows": result.rows})
        tracker.log_artifact(result.dataset_dir / "_manifest.json")
        return {"dataset_dir": str(result.dataset_dir)}, {"rows": result.rows}

    config = {"text_len": cfg.tokenizer.text_len, "bpe_dropout": cfg.tokenizer.bpe_dropout}
    # new curated shards add parts; another dVAE or tokenizer starts another folder
    folder_config = {**config, "source": curated["outputs"]["curated_dir"], "dvae": dvae["key"],
                     "tokenizer": tokenizer["key"]}
    return run_stage(stages, "tokenize-corpus", config, {"filter": curated, "dvae": dvae, "text-tokenizer": tokenizer},
                     ("tokenize_corpus", "dvae", "text", "training", "cluster.py"), build, folder_config)


@task(name="prior", **STAGE_TASK)
def train_prior(cfg: PipelineConfig, dataset: Record, stages: Stages) -> Record:
    def build(folder: Path, tracker: Tracker):
        from dalle_pipeline.components.prior.train import run

        result = run(cfg.prior, dataset["outputs"]["dataset_dir"], folder, cfg.seed, tracker)
        return {"checkpoint_dir": str(result.checkpoint_dir)}, result.metrics

    config = {**cfg.prior.model_dump(mode="json"), "seed": cfg.seed}
    return run_stage(stages, "prior", config, {"tokenize-corpus": dataset}, ("prior", "training", "cluster.py"), build)


@task(name="clip", **STAGE_TASK)
def train_clip(cfg: PipelineConfig, curated: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.clip.train import run

    def build(folder: Path, tracker: Tracker):
        result = run(cfg.clip, curated["outputs"]["curated_dir"], folder, cfg.corpus.image_size, cfg.seed, tracker)
        return {"clip_source": result.source}, result.metrics

    config = {**cfg.clip.model_dump(mode="json"), "image_size": cfg.corpus.image_size, "seed": cfg.seed}
    return run_stage(stages, "clip", config, {"filter": curated}, ("clip", "training"), build)


@task(name="base-model", **IO_RETRIES, **STAGE_TASK)
def fetch_base_model(model_uri: str, stages: Stages) -> Record:
    """The registered model a retrain starts from, downloaded into the stage cache."""
    from dalle_pipeline.components.register.run import fetch_bundle, resolve_version

    version = resolve_version(model_uri, stages.parent)
    name = model_uri.removeprefix("models:/").split("@")[0].split("/")[0]

    def build(folder: Path, tracker: Tracker):
        bundle = fetch_bundle(f"models:/{name}/{version}", stages.parent, folder)
        print(f"retraining from {model_uri} (version {version}), bundle in {bundle}")
        return {"bundle_dir": str(bundle), "version": version}, {}

    config = {"model": name, "version": version, "tracking_uri": stages.parent.tracking_uri}
    return run_stage(stages, "base-model", config, {}, ("register",), build)


def base_model_parts(base: Record) -> tuple[Record, Record, Record]:
    """The base model's tokenizer, dVAE and CLIP as the records of stages it does not run again."""
    from dalle_pipeline.components.register.bundle import read_manifest

    bundle = Path(base["outputs"]["bundle_dir"])
    _, clip_source = read_manifest(bundle)
    parts = {"text-tokenizer": {"tokenizer_path": str(bundle / "tokenizer.json")},
             "dvae": {"checkpoint_dir": str(bundle / "dvae")}, "clip": {"clip_source": clip_source}}
    records = {stage: {"stage": stage, "key": f"{base['key']}/{stage}", "outputs": outputs, "metrics": {},
                       "mlflow_run_id": base["mlflow_run_id"], "reused": True} for stage, outputs in parts.items()}
    return records["text-tokenizer"], records["dvae"], records["clip"]


def _prompts(cfg: PipelineConfig):
    """The fixed evaluation set: held-out captions, then the zero-shot holdout pairs, and reference images."""
    from dalle_pipeline.components.corpus import eval_set

    items = eval_set(cfg.corpus, cfg.sample.num_prompts, seed=cfg.sample.seed)
    holdout_items = eval_set(cfg.corpus, max(1, cfg.sample.num_prompts // 2), seed=cfg.sample.seed, holdout_only=True)
    references = eval_set(cfg.corpus, max(256, cfg.sample.num_prompts), seed=cfg.sample.seed + 1)
    return items, holdout_items, references


@task(name="sample", **STAGE_TASK)
def sample(cfg: PipelineConfig, prior: Record, dvae: Record, tokenizer: Record, clip: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.clip.model import load as load_clip
    from dalle_pipeline.components.dvae.model import load as load_dvae
    from dalle_pipeline.components.prior.model import load as load_prior
    from dalle_pipeline.components.sample.run import run
    from dalle_pipeline.components.text.tokenizer import TextTokenizer

    def build(folder: Path, tracker: Tracker):
        items, holdout_items, _ = _prompts(cfg)
        prompts = [item.caption for item in items + holdout_items]
        result = run(cfg.sample, prompts, load_prior(prior["outputs"]["checkpoint_dir"]),
                     load_dvae(dvae["outputs"]["checkpoint_dir"]),
                     TextTokenizer.load(tokenizer["outputs"]["tokenizer_path"], cfg.tokenizer.text_len),
                     load_clip(clip["outputs"]["clip_source"]), folder, tracker)
        return {"grid": str(result.grid), "samples": str(result.samples), "prompts": prompts}, {}

    config = {**cfg.sample.model_dump(mode="json"), "corpus": cfg.corpus.model_dump(mode="json")}
    return run_stage(stages, "sample", config, {"prior": prior, "dvae": dvae, "text-tokenizer": tokenizer,
                                                "clip": clip}, ("sample", "prior", "dvae", "text", "clip", "corpus"),
                     build)


@task(name="evaluate", **STAGE_TASK)
def evaluate(cfg: PipelineConfig, samples: Record, clip: Record, stages: Stages) -> Record:
    import numpy as np

    from dalle_pipeline.components.clip.model import load as load_clip
    from dalle_pipeline.components.evaluate.run import find_inception_weights, run

    # resolved here so that weights appearing in the torch cache later make the stage run again, with FID
    inception_weights = find_inception_weights(cfg.sample.inception_weights)

    def build(folder: Path, tracker: Tracker):
        items, holdout_items, references = _prompts(cfg)
        metrics = run(Path(samples["outputs"]["samples"]), samples["outputs"]["prompts"],
                      np.stack([np.asarray(item.image) for item in references]),
                      load_clip(clip["outputs"]["clip_source"]), folder,
                      specs=[item.specs for item in items + holdout_items],
                      holdout=[False] * len(items) + [True] * len(holdout_items), tracker=tracker,
                      inception_weights=inception_weights)
        return {}, metrics

    config = {"corpus": cfg.corpus.model_dump(mode="json"), "sample_seed": cfg.sample.seed,
              "inception_weights": str(inception_weights) if inception_weights else None}
    return run_stage(stages, "evaluate", config, {"sample": samples, "clip": clip}, ("evaluate", "clip", "corpus"),
                     build)


@task(name="register", **STAGE_TASK)
def register(cfg: PipelineConfig, dvae: Record, prior: Record, tokenizer: Record, clip: Record, samples: Record,
             evaluation: Record, stages: Stages) -> Record:
    from dalle_pipeline.components.register.bundle import build as build_bundle
    from dalle_pipeline.components.register.run import run

    def build(folder: Path, tracker: Tracker):
        bundle_dir = build_bundle(folder / "bundle", cfg, dvae["outputs"]["checkpoint_dir"],
                                  prior["outputs"]["checkpoint_dir"], tokenizer["outputs"]["tokenizer_path"],
                                  clip["outputs"]["clip_source"])
        # the model is logged into the pipeline's parent run, so it sits beside the metrics it was judged by
        registration = run(bundle_dir, evaluation["metrics"], samples["outputs"]["prompts"], stages.parent)
        tracker.set_tags({"champion_decision": registration.decision, "model_version": registration.version})
        return {"model_version": registration.version, "promoted": registration.promoted,
                "champion_decision": registration.decision}, {}

    # registering into another MLflow store is another stage
    config = {"tracking_uri": stages.parent.tracking_uri, "sample": cfg.sample.model_dump(mode="json"),
              "text_len": cfg.tokenizer.text_len}
    return run_stage(stages, "register", config, {"dvae": dvae, "prior": prior, "text-tokenizer": tokenizer,
                                                  "clip": clip, "evaluate": evaluation}, ("register",), build)


@flow(name="train-dalle", log_prints=True)
def train_dalle(preset: PresetName = "tiny", overrides: PipelineOverrides = PipelineOverrides(),  # frozen: shareable
                root: str | None = None, rerun: list[StageName] | None = None, retrain_from: str | None = None,
                retrain_dvae: bool = False) -> dict:
    """Train a DALL-E-style model end to end: corpus -> download -> filter -> tokenizers -> dVAE ->
    token Parquet -> prior (Ray Train) -> CLIP -> samples reranked by CLIP -> evaluation -> the
    registered model `dalle` (champion alias when it beats the current champion).

    A stage whose config, upstream stages and code are unchanged since a finished run is reused
    (see `components/stage_cache.py`); `rerun` names stages to run anyway (`["all"]` for every one).
    `retrain_from` (e.g. `models:/dalle@champion`) fine-tunes that model instead: its config is the
    base for `overrides`, its tokenizer, dVAE and CLIP are kept, its prior starts the training, and
    the new version is judged against the champion on the same evaluation set. `retrain_dvae`
    fine-tunes its dVAE too (from its weights, on the whole curated corpus), re-tokenizes the corpus
    with it, and the prior fine-tunes on those tokens.
    """
    if retrain_dvae and retrain_from is None:
        raise ValueError("retrain_dvae fine-tunes the dVAE of the model named by retrain_from; set retrain_from "
                         "(a full run trains its dVAE anyway)")
    if retrain_from is None:
        cfg = config_module.resolve(preset, overrides)  # a bad value fails here, before any work
    rerun_set = frozenset(rerun or ())
    unknown = sorted(rerun_set - set(StageName.__args__))
    if unknown:  # Prefect validates deployment runs against the signature; a direct call lands here
        raise ValueError(f"rerun: unknown stages {unknown}; stages are {list(StageName.__args__)}")
    logger = get_run_logger()
    root_dir = Path(root).resolve() if root else default_root()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tracking_uri = default_tracking_uri(root_dir)
    kind = "retrain" if retrain_from else "train"
    parent = Tracker.start(
        tracking_uri, run_name=f"{kind}-dalle-{preset}-{stamp}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "preset": preset, "stages_root": str(root_dir / "stages"),
              **({"retrain_from": retrain_from} if retrain_from else {})},
        artifact_root=(root_dir / "mlartifacts").as_uri(),
    )
    stages = Stages(parent=parent, cache=StageCache(root_dir / "stages"), rerun=rerun_set)
    started = time.perf_counter()
    try:
        base = None
        if retrain_from is not None:
            base = fetch_base_model(retrain_from, stages)
            from dalle_pipeline.components.register.bundle import read_manifest

            bundle = Path(base["outputs"]["bundle_dir"])
            inits = {"prior.init_from": str(bundle / "prior"),
                     **({"dvae.init_from": str(bundle / "dvae")} if retrain_dvae else {})}
            cfg = config_module.resolve(preset, {**config_module.dotted_overrides(overrides), **inits},
                                        base=read_manifest(bundle)[0])
        config_json = cfg.model_dump(mode="json")
        parent.log_params(config_json)
        parent.log_dict(config_json, "config.json")
        logger.info("MLflow run %s at %s; stage outputs under %s", parent.run_id, tracking_uri, root_dir / "stages")
        corpus = make_corpus(cfg, stages)
        downloaded = download(cfg, corpus, stages)
        curated = filter_corpus(cfg, downloaded, stages)
        if base is None:
            tokenizer = train_text_tokenizer(cfg, curated, stages)
            dvae = train_dvae(cfg, curated, stages)
            clip = train_clip(cfg, curated, stages)
        else:
            tokenizer, dvae, clip = base_model_parts(base)
            if retrain_dvae:
                dvae = train_dvae(cfg, curated, stages)
        dataset = tokenize_corpus(cfg, curated, dvae, tokenizer, stages)
        prior = train_prior(cfg, dataset, stages)
        samples = sample(cfg, prior, dvae, tokenizer, clip, stages)
        evaluation = evaluate(cfg, samples, clip, stages)
        registration = register(cfg, dvae, prior, tokenizer, clip, samples, evaluation, stages)
    except BaseException:
        parent.end("FAILED")
        raise
    finally:
        disconnect()  # the local Ray the training stages started, if they did
    ran = [corpus, downloaded, curated, dataset, prior, samples, evaluation, registration]
    ran += [tokenizer, dvae, clip] if base is None else [base, *([dvae] if retrain_dvae else [])]
    reused = [record["stage"] for record in ran if record["reused"]]
    metrics = evaluation["metrics"]
    parent.log_metrics({**metrics, "pipeline_seconds": time.perf_counter() - started, "stages_reused": len(reused)})
    parent.log_artifact(samples["outputs"]["grid"])
    parent.end("FINISHED")
    publish_run_artifacts(parent, ran, metrics, samples["outputs"]["grid"], registration["outputs"])
    summary = {
        "mlflow_run_id": parent.run_id,
        "tracking_uri": tracking_uri,
        "reused_stages": reused,
        "sample_grid": samples["outputs"]["grid"],
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 1),
        **registration["outputs"],
    }
    headline = {k: round(v, 3) for k, v in metrics.items()
                if k.startswith(("oracle_", "holdout_oracle_", "fd_clip", "clip_score")) and k.endswith("reranked")}
    logger.info("done in %.0fs (%d of %d stages reused): MLflow run %s, samples %s, %s", summary["seconds"],
                len(reused), len(ran), parent.run_id, samples["outputs"]["grid"], headline)
    return summary


def publish_run_artifacts(parent: Tracker, records: list[Record], metrics: dict[str, float], grid: str,
                          registration: dict[str, Any]) -> None:
    """Prefect artifacts of the flow run: a table of stage timings and a markdown summary."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    timings = [{"stage": record["stage"], "cache": "reused" if record["reused"] else "built",
                "seconds": round(record.get("seconds", 0.0), 1),
                "seconds_to_build": round(record.get("build_seconds", record.get("seconds", 0.0)), 1)}
               for record in records]
    create_table_artifact(timings, key="stage-timings", description="Seconds per stage in this run")
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    link = (f"[{parent.run_id}]({parent.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent.run_id})"
            if parent.tracking_uri.startswith("http") else f"`{parent.run_id}` in `{parent.tracking_uri}`")
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()) if name.endswith("reranked"))
    picture = Path(grid).read_bytes()
    image = (f"![samples](data:image/png;base64,{base64.b64encode(picture).decode()})" if len(picture) < 2_000_000
             else f"samples: `{grid}`")
    create_markdown_artifact(
        f"# train-dalle\n\nMLflow run {link}; model version {registration['model_version']}: "
        f"{registration['champion_decision']}\n\n| metric (best of the candidates by CLIP) | value |\n|---|---|\n{rows}"
        f"\n\n{image}\n",
        key="train-dalle-summary", description="Metrics, MLflow run and sample grid of this run",
    )


