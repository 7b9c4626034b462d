"""The `train-dalle` flow: every stage of DESIGN.md, each a thin task around one component's `run`.

Imports are absolute: Prefect loads a deployment's entrypoint as a script by its file path, where
relative imports fail. Tasks take and return paths, ids and configs, never tensors. Each opens a nested MLflow run under
the flow's parent run (tagged with the Prefect flow run id), so the MLflow UI shows one run per
pipeline execution with one child per stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from dalle_pipeline.components import config as config_module
from dalle_pipeline.components.config import PipelineConfig
from dalle_pipeline.components.tracking import Tracker, default_root, default_tracking_uri, stage_run

STAGE_TASK = {"cache_policy": NO_CACHE}


@task(name="corpus", **STAGE_TASK)
def make_corpus(cfg: PipelineConfig, run_dir: Path, parent: Tracker) -> Path:
    from dalle_pipeline.components.corpus import generate

    with stage_run(parent, "corpus", cfg.corpus.model_dump(mode="json")) as tracker:
        result = generate(cfg.corpus, run_dir / "corpus")
        tracker.log_metrics({"num_images": result.num_images})
    return result.url_list


@task(name="download", retries=1, **STAGE_TASK)
def download(cfg: PipelineConfig, url_list: Path, run_dir: Path, parent: Tracker) -> Path:
    from dalle_pipeline.components.download.run import run

    with stage_run(parent, "download", cfg.download.model_dump(mode="json")) as tracker:
        result = run(cfg.download, url_list, run_dir / "download", image_size=cfg.corpus.image_size)
        tracker.log_metrics({"successes": result.successes, "failures": result.failures, "new_urls": result.new_urls,
                             **{f"failed_{k}": v for k, v in result.failures_by_reason.items()}})
        print(f"downloaded {result.successes} images ({result.new_urls} URLs new), {result.failures} failed "
              f"{result.failures_by_reason}")
    return result.shards_dir


@task(name="filter", **STAGE_TASK)
def filter_corpus(cfg: PipelineConfig, shards_dir: Path, run_dir: Path, parent: Tracker) -> Path:
    from prefect.artifacts import create_table_artifact

    from dalle_pipeline.components.filter.run import run

    with stage_run(parent, "filter", cfg.filter.model_dump(mode="json")) as tracker:
        result = run(cfg.filter, shards_dir, run_dir / "curated")
        tracker.log_metrics({"kept": result.kept, **{f"dropped_{k}": v for k, v in result.dropped_by_reason.items()}})
        tracker.log_artifact(result.report_path)
        print(f"kept {result.kept} samples, dropped {result.dropped_by_reason}")
    rows = [{"stage": "filter", "reason": "kept", "samples": result.kept}]
    rows += [{"stage": "filter", "reason": k, "samples": v} for k, v in result.dropped_by_reason.items()]
    rows += [{"stage": "download", "reason": k, "samples": v} for k, v in result.download_failures_by_reason.items()]
    create_table_artifact(rows, key="filter-report", description="Samples kept and dropped, by reason")
    return result.curated_dir


@task(name="text-tokenizer", **STAGE_TASK)
def train_text_tokenizer(cfg: PipelineConfig, curated_dir: Path, run_dir: Path, parent: Tracker) -> Path:
    from dalle_pipeline.components.shards import iter_samples
    from dalle_pipeline.components.text.tokenizer import run

    with stage_run(parent, "text-tokenizer", cfg.tokenizer.model_dump(mode="json")) as tracker:
        captions = [sample.caption for sample in iter_samples(curated_dir)]
        path, digest = run(cfg.tokenizer, captions, run_dir / "tokenizer")
        tracker.set_tags({"tokenizer_hash": digest})
        tracker.log_artifact(path)
    return path


@task(name="dvae", **STAGE_TASK)
def train_dvae(cfg: PipelineConfig, curated_dir: Path, run_dir: Path, parent: Tracker) -> Path:
    from dalle_pipeline.components.dvae.train import run

    with stage_run(parent, "dvae", cfg.dvae.model_dump(mode="json")) as tracker:
        result = run(cfg.dvae, curated_dir, run_dir / "dvae", cfg.corpus.image_size, cfg.seed, tracker)
    return result.checkpoint_dir


@task(name="tokenize-corpus", **STAGE_TASK)
def tokenize_corpus(cfg: PipelineConfig, curated_dir: Path, dvae_dir: Path, tokenizer_path: Path, run_dir: Path,
                    parent: Tracker) -> Path:
    from dalle_pipeline.components.tokenize_corpus.run import run

    with stage_run(parent, "tokenize-corpus") as tracker:
        result = run(curated_dir, dvae_dir, tokenizer_path, run_dir / "tokens", cfg.tokenizer.text_len,
                     bpe_dropout=cfg.tokenizer.bpe_dropout)
        tracker.log_metrics({"rows": result.rows})
        tracker.log_artifact(result.dataset_dir / "_manifest.json")
    return result.dataset_dir


@task(name="prior", **STAGE_TASK)
def train_prior(cfg: PipelineConfig, dataset_dir: Path, run_dir: Path, parent: Tracker) -> Path:
    import ray

    from dalle_pipeline.components.prior.train import run

    started_ray = not ray.is_initialized()
    try:
        with stage_run(parent, "prior", cfg.prior.model_dump(mode="json")) as tracker:
            result = run(cfg.prior, dataset_dir, run_dir / "prior", cfg.seed, tracker)
    finally:
        if started_ray:
            ray.shutdown()
    return result.checkpoint_dir


@task(name="clip", **STAGE_TASK)
def train_clip(cfg: PipelineConfig, curated_dir: Path, run_dir: Path, parent: Tracker) -> str:
    from dalle_pipeline.components.clip.train import run

    with stage_run(parent, "clip", cfg.clip.model_dump(mode="json")) as tracker:
        result = run(cfg.clip, curated_dir, run_dir / "clip", cfg.corpus.image_size, cfg.seed, tracker)
    return result.source


@task(name="sample-and-evaluate", **STAGE_TASK)
def sample_and_evaluate(cfg: PipelineConfig, prior_dir: Path, dvae_dir: Path, tokenizer_path: Path,
                        clip_source: str, run_dir: Path, parent: Tracker) -> dict[str, Any]:
    import numpy as np

    from dalle_pipeline.components.clip.train import load as load_clip
    from dalle_pipeline.components.corpus import eval_set
    from dalle_pipeline.components.dvae.train import load as load_dvae
    from dalle_pipeline.components.evaluate.run import run as evaluate
    from dalle_pipeline.components.prior.train import load as load_prior
    from dalle_pipeline.components.sample.run import run as sample
    from dalle_pipeline.components.text.tokenizer import TextTokenizer

    items = eval_set(cfg.corpus, cfg.sample.num_prompts, seed=cfg.sample.seed)
    holdout_items = eval_set(cfg.corpus, max(1, cfg.sample.num_prompts // 2), seed=cfg.sample.seed, holdout_only=True)
    references = eval_set(cfg.corpus, max(256, cfg.sample.num_prompts), seed=cfg.sample.seed + 1)
    prompts = [item.caption for item in items + holdout_items]
    clip = load_clip(clip_source)
    with stage_run(parent, "sample", cfg.sample.model_dump(mode="json")) as tracker:
        samples = sample(cfg.sample, prompts, load_prior(prior_dir), load_dvae(dvae_dir),
                         TextTokenizer.load(tokenizer_path, cfg.tokenizer.text_len), clip, run_dir / "samples", tracker)
    with stage_run(parent, "evaluate") as tracker:
        metrics = evaluate(
            samples.samples, prompts, np.stack([np.asarray(item.image) for item in references]), clip,
            run_dir / "evaluation", specs=[item.specs for item in items + holdout_items],
            holdout=[False] * len(items) + [True] * len(holdout_items), tracker=tracker,
        )
    return {"grid": str(samples.grid), "metrics": metrics, "prompts": prompts}


@task(name="register", **STAGE_TASK)
def register(cfg: PipelineConfig, dvae_dir: Path, prior_dir: Path, tokenizer_path: Path, clip_source: str,
             evaluation: dict[str, Any], run_dir: Path, parent: Tracker) -> dict[str, Any]:
    from dalle_pipeline.components.register.bundle import build
    from dalle_pipeline.components.register.run import run

    bundle_dir = build(run_dir / "bundle", cfg, dvae_dir, prior_dir, tokenizer_path, clip_source)
    with stage_run(parent, "register") as tracker:
        # the model is logged into the pipeline's parent run, so it sits beside the metrics it was judged by
        registration = run(bundle_dir, evaluation["metrics"], evaluation["prompts"], parent)
        tracker.set_tags({"champion_decision": registration.decision, "model_version": registration.version})
    return {"model_version": registration.version, "promoted": registration.promoted,
            "champion_decision": registration.decision}


@flow(name="train-dalle", log_prints=True)
def train_dalle(preset: str = "tiny", overrides: dict[str, Any] | None = None, root: str | None = None) -> dict:
    """Train a DALL-E-style model end to end: corpus -> download -> filter -> tokenizers -> dVAE ->
    token Parquet -> prior (Ray Train) -> CLIP -> samples reranked by CLIP -> evaluation -> the
    registered model `dalle` (champion alias when it beats the current champion)."""
    cfg = config_module.resolve(preset, overrides)  # a bad value fails here, before any work
    logger = get_run_logger()
    root_dir = Path(root).resolve() if root else default_root()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root_dir / "pipeline" / f"{stamp}-{flow_run.get_name() or 'local'}"
    tracking_uri = default_tracking_uri(root_dir)
    parent = Tracker.start(
        tracking_uri, run_name=f"train-dalle-{preset}-{stamp}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), "preset": preset, "run_dir": str(run_dir)},
        artifact_root=(root_dir / "mlartifacts").as_uri(),
    )
    config_json = cfg.model_dump(mode="json")
    parent.log_params(config_json)
    parent.log_dict(config_json, "config.json")
    logger.info("MLflow run %s at %s; outputs under %s", parent.run_id, tracking_uri, run_dir)
    started = time.perf_counter()
    try:
        url_list = make_corpus(cfg, run_dir, parent)
        shards_dir = download(cfg, url_list, run_dir, parent)
        curated_dir = filter_corpus(cfg, shards_dir, run_dir, parent)
        tokenizer_path = train_text_tokenizer(cfg, curated_dir, run_dir, parent)
        dvae_dir = train_dvae(cfg, curated_dir, run_dir, parent)
        dataset_dir = tokenize_corpus(cfg, curated_dir, dvae_dir, tokenizer_path, run_dir, parent)
        prior_dir = train_prior(cfg, dataset_dir, run_dir, parent)
        clip_source = train_clip(cfg, curated_dir, run_dir, parent)
        evaluation = sample_and_evaluate(cfg, prior_dir, dvae_dir, tokenizer_path, clip_source, run_dir, parent)
        registration = register(cfg, dvae_dir, prior_dir, tokenizer_path, clip_source, evaluation, run_dir, parent)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.log_metrics({**evaluation["metrics"], "pipeline_seconds": time.perf_counter() - started})
    parent.log_artifact(evaluation["grid"])
    parent.end("FINISHED")
    summary = {
        "mlflow_run_id": parent.run_id,
        "tracking_uri": tracking_uri,
        "run_dir": str(run_dir),
        "sample_grid": evaluation["grid"],
        "metrics": evaluation["metrics"],
        "seconds": round(time.perf_counter() - started, 1),
        **registration,
    }
    headline = {k: round(v, 3) for k, v in evaluation["metrics"].items()
                if k.startswith(("oracle_", "holdout_oracle_", "fd_clip", "clip_score")) and k.endswith("reranked")}
    logger.info("done in %.0fs: MLflow run %s, samples %s, %s", summary["seconds"], parent.run_id,
                evaluation["grid"], headline)
    return summary
