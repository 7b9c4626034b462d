"""The stage tasks of the `train-dalle` flow: each is one call of one component function.

A task names its component function and the arguments it passes; `Stages.run` derives the
stage's key from exactly those (see `components/stage_cache.py`), reuses a stage finished with
that key, or runs the call in a nested MLflow run (tagged with the cache decision). Either way the
stage's record holds the component's own result (paths and ids, never tensors), and its run shows
that result the same way for every stage (`show_result`): its `metrics`, and the fields its class
names in `TAGS` and `ARTIFACTS`. Imports are absolute: Prefect loads the flow's
entrypoint as a script by its file path, where relative imports fail.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from dalle_pipeline.components.config import PipelineConfig
from dalle_pipeline.components.evaluate.evaluation_set import EvaluationSet
from dalle_pipeline.components.parallel import cluster_nodes
from dalle_pipeline.components.stage_cache import (CHECKPOINT_STORE, OUTPUT_DIR, TRACKER, StageCache, StageRecord,
                                                  bind_call, result_type)
from dalle_pipeline.components.storage import is_object_store, remove_tree
from dalle_pipeline.components.tracking import Tracker, stage_run
from dalle_pipeline.flows.concurrency import training_slot
from dalle_pipeline.flows.stage_names import COMPUTE_STAGES, EVERY_STAGE, STAGES, TRAINING_STAGES

if TYPE_CHECKING:  # the records' types: each task imports its component when it runs
    from dalle_pipeline.components.clip.train import ClipResult
    from dalle_pipeline.components.corpus.shapes import CorpusResult
    from dalle_pipeline.components.download.run import DownloadResult
    from dalle_pipeline.components.dvae.train import DVAEResult
    from dalle_pipeline.components.evaluate.run import EvaluationResult
    from dalle_pipeline.components.filter.run import FilterResult
    from dalle_pipeline.components.prior.train import PriorResult
    from dalle_pipeline.components.register.run import FetchedBundle, Registration
    from dalle_pipeline.components.sample.run import SampleResult
    from dalle_pipeline.components.text.tokenizer import TextTokenizerResult
    from dalle_pipeline.components.tokenize_corpus.run import TokenizedCorpus

# stages that fetch over the network retry: each is idempotent (a download resumes its batch)
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 10}
PROGRESS_POLL_S = 5.0
STAGE_CALL_FILE = "stage_call.json"  # what a stage run was called with (its arguments, paths as they are)
Result = TypeVar("Result")


@dataclass(frozen=True)
class Stages:
    """What every stage task needs besides its inputs: the parent MLflow run and the stage cache."""

    parent: Tracker
    cache: StageCache
    rerun: frozenset[str] = frozenset()  # stage names to run even when cached; EVERY_STAGE for every stage

    def run(self, function: Callable[..., Result], *args: Any, accumulates: bool = False, on_ray: bool = False,
            reads_in_place: tuple[str, ...] = (), writes_in_place: bool = False, **kwargs: Any) -> StageRecord[Result]:
        """In the task of a stage (`stage_task`): `function(*args, **kwargs, out_dir=<stage folder>[,
        tracker=<stage run>])` in a nested MLflow run, unless a stage finished with the same key: then log
        that it was reused (tags `cache`, `built_by_run`) and return its record. The result is shown on the
        stage's run either way (`show_result`). `accumulates`: the folder is named by the call's settings and
        input locations (a growing URL list keeps its folder), not by its key. `on_ray`: the function spreads its
        work over the Ray session open in this process (`components/parallel.py`): join the cluster first.
        `reads_in_place`: the arguments (by name) the function reads as an object store's URL too
        (`storage.StorePath`): one into a stage finished on the store that the cache does not hold is given as its
        URL, not fetched (the key is the call's as it was made: where an input is read from changes nothing);
        on a Ray cluster of several nodes, one into any stage finished on the store, so no node needs this cache.
        `writes_in_place`: the function writes to an `out_dir` given as a URL, so where the root is an object
        store the stage builds its folder there (its tasks on any node write their objects whole), nothing in the
        cache but its record (`StageCache.open_on_store`, `commit(on_store=True)`): a stage after it reads it as
        one finished there."""
        name = current_stage()
        bound = bind_call(function, args, kwargs)
        key = self.cache.call_key(name, function, bound.arguments)
        folder = self.cache.folder(name, self.cache.call_key(name, function, bound.arguments, content=False)
                                   if accumulates else key)
        started = time.perf_counter()
        # the call goes in as an artifact, not as params: the parent run holds the config as params, and MLflow's
        # image charts print every param of a run above its image (the prior's 37 hid its preview)
        with stage_run(self.parent, name) as tracker:
            call_document = self.cache.stage_value(bound.arguments, content=False)
            tracker.log_dict(call_document, STAGE_CALL_FILE)
            forced = name in self.rerun or EVERY_STAGE in self.rerun
            record = None if forced else self.cache.lookup(folder, key, result_type(function))
            if record is not None:
                tracker.set_tags({"cache": "hit", "cache_key": key, "built_by_run": record.mlflow_run_id,
                                  "stage_dir": str(folder)})
                show_result(record.outputs, tracker, artifacts=False)
                print(f"{name}: inputs unchanged, reusing {folder} (built by MLflow run {record.mlflow_run_id})")
                return replace(record, reused=True, seconds=time.perf_counter() - started)
            tracker.set_tags({"cache": "forced" if forced else "miss", "cache_key": key, "stage_dir": str(folder)})
            on_store = writes_in_place and self.cache.remote is not None
            if forced:
                shutil.rmtree(folder, ignore_errors=True)  # from scratch: no resuming from the last build's checkpoints
            if on_store:  # an unfinished (or accumulating) build there is kept: the stage resumes from it
                out_dir = self.cache.open_on_store(folder, clear=forced)
                print(f"{name}: building in place on the store, {out_dir}")
            else:
                if not forced and accumulates and self.cache.fetch_to_accumulate(folder):
                    print(f"{name}: adding to its last build, fetched from {self.cache.remote}")
                folder.mkdir(parents=True, exist_ok=True)  # an unfinished folder is kept: stages resume from it
                out_dir = folder
            if on_ray:
                from dalle_pipeline.components.cluster import connect

                connect()
            # a cluster of several nodes reads its inputs from the store, where every node finds them
            several = bool(reads_in_place) and self.cache.remote is not None and cluster_nodes() > 1
            arguments = self.cache.in_place(bound.arguments, reads_in_place, prefer_store=several)
            for argument, value in arguments.items():
                if value is not bound.arguments[argument]:
                    print(f"{name}: reads {argument} where it lies on the store, {value}")
            self.cache.fetch_inputs(self.cache.stage_value(arguments, content=False))  # the rest only the store holds
            call = dict(arguments, **{OUTPUT_DIR: out_dir})
            parameters = inspect.signature(function).parameters
            if TRACKER in parameters:
                call[TRACKER] = tracker
            if CHECKPOINT_STORE in parameters:
                call[CHECKPOINT_STORE] = checkpoints = self.cache.checkpoint_store(folder)
                if checkpoints is not None:
                    if forced:  # from scratch here too
                        remove_tree(checkpoints)
                    print(f"{name}: keeps its training checkpoints on the store, {checkpoints}")
            with self._slot(name, tracker), stage_progress(name, tracker):
                result = function(**call)
            if on_store:
                result = self.cache.in_cache(result)  # its paths the cache's, as every record's are
            seconds = time.perf_counter() - started
            record = StageRecord(stage=name, key=key, folder=folder, outputs=result, metrics=result.metrics,
                                 mlflow_run_id=tracker.run_id, build_seconds=seconds)
            self.cache.commit(record, on_store=on_store)
            show_result(result, tracker, readable=self.cache.readable)
            return replace(record, seconds=seconds)

    @contextlib.contextmanager
    def _slot(self, name: str, tracker: Tracker):
        """A compute stage holds a slot of the `training` limit while it runs (flows/concurrency.py)."""
        if name not in COMPUTE_STAGES:
            yield
            return
        with training_slot(name) as waited:
            tracker.log_metrics({"training_slot_wait_s": waited})
            yield


@contextlib.contextmanager
def stage_progress(name: str, tracker: Tracker, every_s: float = PROGRESS_POLL_S):
    """For a stage that trains, a Prefect progress artifact (`<stage>-progress`) on the flow run page,
    moved every `every_s` seconds to the `progress` metric its training loop logs to the stage's
    MLflow run (the loop runs in Ray workers, which have no Prefect context; MLflow is the seam
    they share), and to 100 when the stage ends."""
    if name not in TRAINING_STAGES:
        yield
        return
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(0.0, key=f"{name}-progress",
                                           description=f"{name}: share of its training steps done")
    done = threading.Event()

    def follow() -> None:
        shown = 0.0
        while not done.wait(every_s):
            try:
                value = tracker.client.get_run(tracker.run_id).data.metrics.get("progress")
                if value is not None and 100 * value > shown:
                    shown = 100 * value
                    update_progress_artifact(artifact_id, shown)
            except Exception as error:  # a busy store or API misses one update, never the stage
                print(f"{name}: progress not updated ({type(error).__name__}: {error})", flush=True)

    follower = threading.Thread(target=follow, name=f"{name}-progress", daemon=True)
    follower.start()
    try:
        yield
    finally:
        done.set()
        follower.join()
    update_progress_artifact(artifact_id, 100.0)


def stage_task(name: str, **options: Any) -> Callable:
    """The Prefect task of the stage `name` (a key of `stage_names.STAGES`), which `Stages.run` inside it
    takes the stage's name from. Prefect's own result cache stays off: our StageCache decides what to skip,
    and Prefect's would skip a stage without an MLflow record of the reuse."""
    if name not in STAGES:
        raise ValueError(f"no stage {name!r} in stage_names.STAGES")
    return task(name=name, cache_policy=NO_CACHE, **options)


def current_stage() -> str:
    """The stage whose task is running."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None or context.task.name not in STAGES:
        raise RuntimeError("Stages.run runs inside a stage's task (stage_task)")
    return context.task.name


def show_result(result: Any, tracker: Tracker, artifacts: bool = True,
                readable: Callable[[Any], Path] = Path) -> None:
    """A stage's result on its MLflow run, the same way for every stage: its summary `metrics` (at its
    `step`, where a training stage's result says which update its weights are from), the fields its
    class names in `TAGS` as tags (a dict field's items each), and, unless it is a reused result
    (already logged in the run that built it), the files of the fields named in `ARTIFACTS` (where `readable`
    gives them: a stage built on the store, a copy). A metric the run already holds is left as it is: a
    training stage logged it on its curve, window by window."""
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    tracker.log_metrics({name: value for name, value in result.metrics.items() if name not in logged},
                        step=getattr(result, "step", None))
    tags: dict[str, Any] = {}
    for name in getattr(result, "TAGS", ()):
        value = getattr(result, name)
        tags.update(value if isinstance(value, dict) else {name: value})
    if tags:
        tracker.set_tags(tags)
    for name in getattr(result, "ARTIFACTS", ()) if artifacts else ():
        if (path := getattr(result, name)) is not None:
            tracker.log_artifact(readable(path))


def derived(stage: str, outputs: Any, base: StageRecord) -> StageRecord:
    """A part of a base model (its tokenizer, dVAE, CLIP) as the record of a stage not run again."""
    return StageRecord(stage=stage, key=f"{base.key}/{stage}", folder=base.folder, outputs=outputs, metrics={},
                       mlflow_run_id=base.mlflow_run_id, build_seconds=0.0, reused=True)


@stage_task("corpus")
def make_corpus(cfg: PipelineConfig, stages: Stages) -> StageRecord[CorpusResult]:
    """The embedded shapes corpus as a URL list of file:// images."""
    from dalle_pipeline.components.corpus.shapes import run

    return stages.run(run, cfg.corpus)


@stage_task("download", **IO_RETRIES)
def download(cfg: PipelineConfig, url_list: str, stages: Stages) -> StageRecord[DownloadResult]:
    from dalle_pipeline.components.download.run import run

    # one folder per URL list location and settings: a list that grows downloads only its new rows
    record = stages.run(run, cfg.download_settings(), url_list, image_size=cfg.corpus.image_size,
                        url_col=cfg.data.url_col, caption_col=cfg.data.caption_col, accumulates=True,
                        on_ray=cfg.download.distributor != "multiprocessing", writes_in_place=True)
    print(record.outputs.describe("downloaded"))
    return record


@stage_task("ingest")
def ingest(cfg: PipelineConfig, stages: Stages) -> StageRecord[DownloadResult]:
    """A local source (folder, webdataset, Parquet with images, COCO) into the download stage's layout."""
    from dalle_pipeline.components.sources import run

    source = cfg.data.source  # a URL: a source on an object store, read there
    data = cfg.data.model_copy(update={"source": source if is_object_store(source)
                                       else str(Path(source).expanduser().resolve())})
    # one folder per source location and settings: a folder that grows ingests only its new files
    record = stages.run(run, data, cfg.download_settings(), image_size=cfg.corpus.image_size, accumulates=True,
                        on_ray=True, writes_in_place=True)
    print(record.outputs.describe("ingested"))
    return record


@stage_task("filter")
def filter_corpus(cfg: PipelineConfig, downloaded: StageRecord[DownloadResult],
                  stages: Stages) -> StageRecord[FilterResult]:
    from prefect.artifacts import create_table_artifact

    from dalle_pipeline.components.filter.run import require_usable, run

    record = stages.run(run, cfg.filter_settings(), downloaded.outputs.shards_dir,
                        holdout_fraction=cfg.holdout_fraction, accumulates=True, on_ray=True,
                        reads_in_place=("shards_dir",), writes_in_place=True)
    print(record.outputs.describe())
    create_table_artifact(record.outputs.report_rows(), key="filter-report",
                          description="Samples kept and dropped, by reason")
    require_usable(record.outputs)  # nothing to train on: fail here, with the counts, not in a trainer
    return record


@stage_task("text-tokenizer")
def train_text_tokenizer(cfg: PipelineConfig, curated: StageRecord[FilterResult],
                         stages: Stages) -> StageRecord[TextTokenizerResult]:
    from dalle_pipeline.components.text.tokenizer import run

    return stages.run(run, cfg.tokenizer, curated.outputs.curated_dir, reads_in_place=("curated_dir",),
                      writes_in_place=True)


@stage_task("dvae")
def train_dvae(cfg: PipelineConfig, curated: StageRecord[FilterResult], stages: Stages) -> StageRecord[DVAEResult]:
    from dalle_pipeline.components.dvae.train import run

    return stages.run(run, cfg.dvae, curated.outputs.curated_dir, image_size=cfg.corpus.image_size,
                      seed=cfg.seed, shapes=cfg.corpus if cfg.shapes_corpus else None, reads_in_place=("curated_dir",))


@stage_task("tokenize-corpus")
def tokenize_corpus(cfg: PipelineConfig, curated: StageRecord[FilterResult], dvae: StageRecord[DVAEResult],
                    tokenizer: StageRecord[TextTokenizerResult], stages: Stages) -> StageRecord[TokenizedCorpus]:
    from dalle_pipeline.components.tokenize_corpus.run import run

    # new curated shards add parts; another dVAE or tokenizer (another folder in their paths) starts another folder
    return stages.run(run, curated.outputs.curated_dir, dvae.outputs.checkpoint_dir,
                      tokenizer.outputs.tokenizer_path, text_len=cfg.tokenizer.text_len,
                      bpe_dropout=cfg.tokenizer.bpe_dropout, accumulates=True,
                      reads_in_place=("curated_dir", "dvae_dir", "tokenizer_path"), writes_in_place=True)


@stage_task("prior")
def train_prior(cfg: PipelineConfig, dataset: StageRecord[TokenizedCorpus], dvae: StageRecord[DVAEResult],
                stages: Stages) -> StageRecord[PriorResult]:
    """The prior on the token Parquet; the dVAE that made the tokens draws its previews in the MLflow run."""
    from dalle_pipeline.components.prior.train import run

    return stages.run(run, cfg.prior, dataset.outputs.dataset_dir, seed=cfg.seed,
                      dvae_dir=dvae.outputs.checkpoint_dir, reads_in_place=("dataset_dir", "dvae_dir"))


@stage_task("clip")
def train_clip(cfg: PipelineConfig, curated: StageRecord[FilterResult], stages: Stages) -> StageRecord[ClipResult]:
    from dalle_pipeline.components.clip.train import run

    return stages.run(run, cfg.clip, curated.outputs.curated_dir, image_size=cfg.corpus.image_size, seed=cfg.seed,
                      reads_in_place=("curated_dir",))


@stage_task("base-model", **IO_RETRIES)
def fetch_base_model(model_uri: str, stages: Stages) -> StageRecord[FetchedBundle]:
    """The registered model a retrain starts from, downloaded into the stage cache."""
    from dalle_pipeline.components.register.run import fetch_bundle, resolve_version

    version = resolve_version(model_uri, stages.parent)
    name = model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    record = stages.run(fetch_bundle, f"models:/{name}/{version}", stages.parent)
    print(f"retraining from {model_uri} (version {version}), bundle in {record.outputs.bundle_dir}")
    return record


def base_model_parts(base: StageRecord[FetchedBundle]) -> tuple[StageRecord, StageRecord, StageRecord]:
    """The base model's tokenizer, dVAE and CLIP as the records of stages it does not run again."""
    from dalle_pipeline.components.clip.train import ClipResult
    from dalle_pipeline.components.dvae.train import DVAEResult
    from dalle_pipeline.components.register.bundle import read_manifest
    from dalle_pipeline.components.storage import file_sha256
    from dalle_pipeline.components.text.tokenizer import TextTokenizerResult

    bundle = base.outputs.bundle_dir
    _, clip_source = read_manifest(bundle)
    tokenizer = TextTokenizerResult(bundle / "tokenizer.json", file_sha256(bundle / "tokenizer.json"), metrics={})
    return (derived(train_text_tokenizer.name, tokenizer, base),
            derived(train_dvae.name, DVAEResult(bundle / "dvae", metrics={}), base),
            derived(train_clip.name, ClipResult(clip_source, metrics={}), base))


@stage_task("sample")
def sample(cfg: PipelineConfig, evaluation: EvaluationSet, prior: StageRecord[PriorResult],
           dvae: StageRecord[DVAEResult], tokenizer: StageRecord[TextTokenizerResult], clip: StageRecord[ClipResult],
           stages: Stages) -> StageRecord[SampleResult]:
    from dalle_pipeline.components.sample.run import run

    return stages.run(run, cfg.sample, evaluation.prompts, prior.outputs.checkpoint_dir,
                      dvae.outputs.checkpoint_dir, tokenizer.outputs.tokenizer_path, cfg.tokenizer.text_len,
                      clip.outputs.clip_source, scenes=evaluation.scenes, specs=evaluation.specs)


@stage_task("evaluate")
def evaluate(cfg: PipelineConfig, evaluation: EvaluationSet, samples: StageRecord[SampleResult],
             clip: StageRecord[ClipResult], dvae: StageRecord[DVAEResult], stages: Stages) -> StageRecord[EvaluationResult]:
    from dalle_pipeline.components.evaluate.run import find_inception_weights, run

    # resolved here, so weights appearing in the torch cache later are a new argument: the stage runs again, with FID
    weights = find_inception_weights(cfg.sample.inception_weights)
    return stages.run(run, samples.outputs.samples, evaluation, clip.outputs.clip_source,
                      inception_weights=str(weights) if weights else None, dvae_dir=dvae.outputs.checkpoint_dir,
                      completions_path=samples.outputs.completions)


@stage_task("register")
def register(cfg: PipelineConfig, dvae: StageRecord[DVAEResult], prior: StageRecord[PriorResult],
             tokenizer: StageRecord[TextTokenizerResult], clip: StageRecord[ClipResult],
             evaluation: StageRecord[EvaluationResult], evaluation_set: EvaluationSet,
             curated: StageRecord[FilterResult], stages: Stages) -> StageRecord[Registration]:
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    from dalle_pipeline.components.register.run import MODEL_NAME, run
    from dalle_pipeline.flows.notifications import CHAMPION_MOVED, champion_resource

    # keyed by the parent's MLflow store (a tracker's stage_key): registering into another store is another stage
    record = stages.run(run, cfg, dvae.outputs.checkpoint_dir, prior.outputs.checkpoint_dir,
                        tokenizer.outputs.tokenizer_path, clip.outputs.clip_source, evaluation.outputs.metrics,
                        evaluation_set.prompts, stages.parent, evaluation_ids=evaluation_set.ids,
                        data_digest=curated.outputs.data_digest or None)
    registration = record.outputs
    if registration.promoted and not record.reused:  # the champion automation (flows/notifications.py) calls its webhook
        emit_event(CHAMPION_MOVED, resource=champion_resource(MODEL_NAME),
                   payload={"version": registration.version, "decision": registration.decision,
                            "flow_run": flow_run.get_name(), "mlflow_run_id": stages.parent.run_id})
    return record
