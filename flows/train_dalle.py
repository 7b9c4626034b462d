"""The `train-dalle` flow: every stage of DESIGN.md, each a thin task around one component call (`stages.py`).

Imports are absolute: Prefect loads a deployment's entrypoint as a script by its file path, where
relative imports fail. Each stage opens a nested MLflow run under the flow's parent run (tagged
with the Prefect flow run id), so the MLflow UI shows one run per pipeline execution with one child
per stage; a stage whose inputs are unchanged is reused from `<root>/stages/` and its child run
says so (`cache` tag).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dalle_pipeline.components import config as config_module
from dalle_pipeline.components.cluster import disconnect
from dalle_pipeline.components.config import PipelineConfig
from dalle_pipeline.components.presets import PresetName
from dalle_pipeline.components.evaluate import headline_metrics
from dalle_pipeline.components.evaluate.evaluation_set import (EvaluationSet, holdout_evaluation_set,
                                                               shapes_evaluation_set)
from dalle_pipeline.components.overrides import PipelineOverrides
from dalle_pipeline.components.shards import HOLDOUT_DIR
from dalle_pipeline.components.sources.kinds import check_source, source_kind, store_kind
from dalle_pipeline.components.stage_cache import StageCache, StageRecord
from dalle_pipeline.components.storage import RunRoot, is_object_store, mirror, run_root
from dalle_pipeline.components.tracking import Tracker, default_root, default_tracking_uri
from dalle_pipeline.components.environment import use_defaults
from dalle_pipeline.flows.concurrency import ensure_training_limit
from dalle_pipeline.flows.stage_names import StageName
from dalle_pipeline.flows.stages import (Stages, base_model_parts, download, evaluate, fetch_base_model,
                                         filter_corpus, ingest, make_corpus, register, sample, tokenize_corpus,
                                         train_clip, train_dvae, train_prior, train_text_tokenizer)


@dataclass(frozen=True)
class PipelineRun:
    """The resolved config of one flow run, where it writes, and its MLflow parent run."""

    cfg: PipelineConfig
    root: RunRoot
    stages: Stages


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
    use_defaults()  # a run a worker started has not been through the CLI
    rerun_set = check_arguments(rerun, retrain_from, retrain_dvae)
    # a bad value fails here, before any work (a retrain's config is the base model's: resolved once it is fetched)
    cfg = config_module.resolve(preset, overrides) if retrain_from is None else None
    if cfg is not None and not cfg.shapes_corpus:
        check_source(cfg.data)  # a source that is none of the kinds is refused before any work
    ensure_training_limit()  # the compute stages queue on it: two runs on one machine take turns
    root_dir, stages = start_run(preset, root, rerun_set, retrain_from)
    started = time.perf_counter()
    try:
        if cfg is not None:
            run = PipelineRun(cfg=cfg, root=root_dir, stages=stages)
            log_config(run)
            records = train_from_scratch(run)
        else:
            run, records = retrain(root_dir, stages, preset, overrides, retrain_from, retrain_dvae)
    except BaseException:
        stages.parent.end("FAILED")
        raise
    finally:
        disconnect()  # the local Ray the training stages started, if they did
    return finish_run(run, records, time.perf_counter() - started)


def check_arguments(rerun: list[str] | None, retrain_from: str | None, retrain_dvae: bool) -> frozenset[str]:
    if retrain_dvae and retrain_from is None:
        raise ValueError("retrain_dvae fine-tunes the dVAE of the model named by retrain_from; set retrain_from "
                         "(a full run trains its dVAE anyway)")
    rerun_set = frozenset(rerun or ())
    unknown = sorted(rerun_set - set(StageName.__args__))
    if unknown:  # Prefect validates deployment runs against the signature; a direct call lands here
        raise ValueError(f"rerun: unknown stages {unknown}; stages are {list(StageName.__args__)}")
    return rerun_set


def start_run(preset: str, root: str | None, rerun: frozenset[str], retrain_from: str | None
              ) -> tuple[RunRoot, Stages]:
    """The root, and what every stage task needs: the MLflow parent run, tagged with the Prefect flow run,
    and the stage cache under the root (on an object store: in its local cache, published to the store)."""
    root_dir = run_root(root, "root") if root else default_root()
    tracking_uri = default_tracking_uri(root_dir)
    kind = "retrain" if retrain_from else "train"
    parent = Tracker.start(
        tracking_uri, run_name=f"{kind}-dalle-{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "preset": preset, "stages_root": root_dir.stages_location,
              **({"retrain_from": retrain_from} if retrain_from else {})},
        artifact_root=root_dir.artifact_uri,
    )
    return root_dir, Stages(parent=parent, cache=StageCache(root_dir.local / "stages", root_dir.stages_url),
                            rerun=rerun)


def log_config(run: PipelineRun) -> None:
    config_json = run.cfg.model_dump(mode="json")
    run.stages.parent.log_params(config_json)
    run.stages.parent.log_dict(config_json, "config.json")
    get_run_logger().info("MLflow run %s at %s; stage outputs under %s", run.stages.parent.run_id,
                          run.stages.parent.tracking_uri, run.root.stages_location)


def curate(run: PipelineRun) -> list[StageRecord]:
    """corpus -> download (the shapes corpus), download (your URL list) or ingest (your local source) -> filter.
    A source on an object store is read there in place where it is webdataset shards or Parquet with images
    (`sources.kinds.store_kind`), else from its mirror in the root's local cache (`storage.mirror`)."""
    cfg, stages = run.cfg, run.stages
    in_place = None  # the kind of a source read on the store where it lies
    if not cfg.shapes_corpus and is_object_store(cfg.data.source):
        if (in_place := store_kind(cfg.data)) is not None:
            print(f"data.source {cfg.data.source}: {in_place}, read where it lies on the store")
        else:
            local = mirror(cfg.data.source, run.root.local / "sources", "data.source")
            print(f"data.source {cfg.data.source}: read from its copy in {local}")
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(local)})})
    records = []
    kind = "shapes" if cfg.shapes_corpus else in_place or source_kind(cfg.data)
    if kind == "shapes":
        records.append(make_corpus(cfg, stages))
        records.append(download(cfg, records[-1].outputs.url_list, stages))
    elif kind == "url_list":
        records.append(download(cfg, str(Path(cfg.data.source).expanduser().resolve()), stages))
    else:
        records.append(ingest(cfg, stages))
    records.append(filter_corpus(cfg, records[-1], stages))
    return records


def train_from_scratch(run: PipelineRun) -> list[StageRecord]:
    cfg, stages = run.cfg, run.stages
    curation = curate(run)
    tokenizer = train_text_tokenizer(cfg, curation[-1], stages)
    dvae = train_dvae(cfg, curation[-1], stages)
    clip = train_clip(cfg, curation[-1], stages)
    return [*curation, tokenizer, dvae, clip, *train_prior_and_judge(run, curation[-1], tokenizer, dvae, clip)]


def build_evaluation_set(cfg: PipelineConfig, curated: StageRecord, cache: StageCache,
                         ids: list[str] | None = None) -> EvaluationSet:
    """The shapes corpus's own set, or your corpus's held-out samples (`ids`: a champion's set), read from the
    curated folder, or where the store alone holds it, from a copy of its held-out shards alone."""
    if cfg.shapes_corpus:
        return shapes_evaluation_set(cfg.corpus, cfg.sample.num_prompts, cfg.sample.seed)
    curated_dir = cache.readable(curated.outputs.curated_dir / HOLDOUT_DIR).parent
    return holdout_evaluation_set(curated_dir, cfg.corpus.image_size, cfg.sample.num_prompts,
                                  cfg.data.holdout_max, cfg.sample.prompts_file, ids)


def retrain(root: RunRoot, stages: Stages, preset: str, overrides: PipelineOverrides, retrain_from: str,
            retrain_dvae: bool) -> tuple[PipelineRun, list[StageRecord]]:
    """Fine-tune the registered model `retrain_from` on the configured data: its config is the base
    of the overrides, its tokenizer and CLIP are kept, its prior (and with `retrain_dvae` its dVAE)
    starts the training."""
    from dalle_pipeline.components.register.bundle import read_evaluation_ids, read_manifest

    base = fetch_base_model(retrain_from, stages)
    bundle = base.outputs.bundle_dir
    stages.cache.fetch_inputs(bundle)  # read here, and its weights start the training
    inits = {"prior.init_from": str(bundle / "prior"),
             **({"dvae.init_from": str(bundle / "dvae")} if retrain_dvae else {})}
    cfg = config_module.resolve(preset, {**config_module.dotted_overrides(overrides), **inits},
                                base=read_manifest(bundle)[0])
    run = PipelineRun(cfg=cfg, root=root, stages=stages)
    log_config(run)
    curation = curate(run)
    ran = [base, *curation]
    tokenizer, dvae, clip = base_model_parts(base)
    if retrain_dvae:
        dvae = train_dvae(cfg, curation[-1], run.stages)
        ran.append(dvae)
    judged_on = read_evaluation_ids(bundle)  # the champion's held-out items: the challenger is judged on them
    return run, [*ran, *train_prior_and_judge(run, curation[-1], tokenizer, dvae, clip, judged_on)]


def train_prior_and_judge(run: PipelineRun, curated: StageRecord, tokenizer: StageRecord, dvae: StageRecord,
                          clip: StageRecord, judged_on: list[str] | None = None) -> list[StageRecord]:
    """tokenize-corpus -> prior -> sample -> evaluate -> register, on the evaluation set built once."""
    cfg, stages = run.cfg, run.stages
    # before training: a bad set fails early
    evaluation_set = build_evaluation_set(cfg, curated, stages.cache, judged_on)
    dataset = tokenize_corpus(cfg, curated, dvae, tokenizer, stages)
    log_lineage(run, curated, dataset)
    prior = train_prior(cfg, dataset, dvae, stages)
    samples = sample(cfg, evaluation_set, prior, dvae, tokenizer, clip, stages)
    evaluation = evaluate(cfg, evaluation_set, samples, clip, dvae, stages)
    registration = register(cfg, dvae, prior, tokenizer, clip, evaluation, evaluation_set, curated, stages)
    return [dataset, prior, samples, evaluation, registration]


def log_lineage(run: PipelineRun, curated: StageRecord, dataset: StageRecord) -> None:
    """The data this pipeline run read, as MLflow datasets of its parent run (each stage logs its own):
    your source, the curated corpus and the token Parquet it trains on, the held-out corpus it is judged on."""
    from dalle_pipeline.components import lineage

    parent, where = run.stages.parent, run.stages.cache.location  # a stage only the store holds is read there
    if not run.cfg.shapes_corpus:
        parent.log_input_dataset(lineage.data_source(run.cfg.data.source), "source")
    parent.log_input_dataset(lineage.curated_corpus(where(curated.outputs.curated_dir)), "training")
    parent.log_input_dataset(lineage.token_dataset(where(dataset.outputs.dataset_dir)), "training")
    held_out = lineage.held_out_corpus(where(curated.outputs.curated_dir))
    if held_out is not None:
        parent.log_input_dataset(held_out, "evaluation")


def finish_run(run: PipelineRun, records: list[StageRecord], seconds: float) -> dict:
    """Log the headline metrics and the sample grid to the parent run, publish the Prefect artifacts,
    and return the run's summary."""
    from dalle_pipeline.flows.artifacts import publish_run_artifacts

    parent = run.stages.parent
    by_stage = {record.stage: record for record in records}
    metrics = by_stage[evaluate.name].outputs.metrics
    grid = str(run.stages.cache.readable(by_stage[sample.name].outputs.grid))
    registration = by_stage[register.name].outputs
    reused = [record.stage for record in records if record.reused]
    parent.log_metrics({**metrics, "pipeline_seconds": seconds, "stages_reused": len(reused)})
    parent.log_artifact(grid)
    parent.end("FINISHED")
    publish_run_artifacts(parent, records, metrics, grid, registration)
    summary = {
        "mlflow_run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "reused_stages": reused,
        "sample_grid": grid,
        "metrics": metrics,
        "seconds": round(seconds, 1),
        "model_version": registration.version,
        "promoted": registration.promoted,
        "champion_decision": registration.decision,
    }
    headline = {name: round(value, 3) for name, value in headline_metrics(metrics).items()}
    get_run_logger().info("done in %.0fs (%d of %d stages reused): MLflow run %s, samples %s, %s", seconds,
                          len(reused), len(records), parent.run_id, grid, headline)
    return summary
