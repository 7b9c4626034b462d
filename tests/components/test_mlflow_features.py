"""What the stages leave in MLflow besides params and metrics, read back through MlflowClient from a real
sqlite store: image series that step through training, system metrics, input datasets with digests and
contexts, and the registered model version's signature, input example and description."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dalle_pipeline.components import checkpoint, lineage
from dalle_pipeline.components.config import PriorConfig, TokenizerConfig
from dalle_pipeline.components.dvae.model import KIND as DVAE_KIND
from dalle_pipeline.components.dvae.model import DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.filter.run import REPORT_NAME, REPORT_SCHEMA, corpus_digest
from dalle_pipeline.components.shards import HOLDOUT_DIR, iter_samples, write_shard
from dalle_pipeline.components.text.tokenizer import train_and_save as train_tokenizer
from dalle_pipeline.components.tracking import Tracker
from test_register import bundle_dir  # noqa: F401 - the same randomly initialised bundle

IMAGE_FILE = re.compile(r"images/(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png")


@pytest.fixture
def tracker(tmp_path):
    return Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "features", artifact_root=(tmp_path / "artifacts").as_uri())


@pytest.fixture
def frequent_system_metrics(monkeypatch):
    """MLflow samples the system every 10 s by default, longer than these stages run."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")


def image_series(tracker: Tracker) -> dict[str, list[int]]:
    """The run's image series as MLflow's image view reads them: key -> the steps logged, sorted."""
    series: dict[str, list[int]] = {}
    for artifact in tracker.client.list_artifacts(tracker.run_id, "images"):
        if match := IMAGE_FILE.fullmatch(artifact.path):
            series.setdefault(match["key"].replace("~", "/"), []).append(int(match["step"]))
    return {key: sorted(steps) for key, steps in series.items()}


def input_datasets(tracker: Tracker) -> dict[str, tuple[str, str, str]]:
    """name -> (digest, context, source) of the run's input datasets."""
    inputs = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
    return {item.dataset.name: (item.dataset.digest, {tag.key: tag.value for tag in item.tags}["mlflow.data.context"],
                                item.dataset.source) for item in inputs}


def system_metrics(tracker: Tracker) -> set[str]:
    return {name for name in tracker.client.get_run(tracker.run_id).data.metrics if name.startswith("system/")}


def save_dvae(directory, seed=0):
    torch.manual_seed(seed)
    cfg = DVAEModelConfig(image_size=32, codebook_size=64, n_hid=8, num_groups=3)
    return checkpoint.save(directory, DVAE_KIND, DiscreteVAE(cfg).state_dict(), cfg.to_dict())


@pytest.fixture(scope="module")
def tokenized(curated_shards, tmp_path_factory):
    """The corpus tokenized for real by the tokenize-corpus stage, with a random dVAE, into its own run:
    (the dVAE, the token dataset, that run)."""
    from dalle_pipeline.components.cluster import disconnect
    from dalle_pipeline.components.tokenize_corpus.run import run as tokenize

    root = tmp_path_factory.mktemp("tokenized")
    dvae_dir = save_dvae(root / "dvae")
    captions = [sample.caption for sample in iter_samples(curated_shards)]
    tokenizer_path, _ = train_tokenizer(TokenizerConfig(vocab_size=300), captions, root / "tok")
    run = Tracker.start(f"sqlite:///{root}/mlflow.db", "tokenize-corpus", artifact_root=(root / "artifacts").as_uri())
    result = tokenize(curated_shards, dvae_dir, tokenizer_path, root / "tokens", text_len=24, tracker=run)
    disconnect()  # the local Ray the stage started
    return dvae_dir, result.dataset_dir, run


def test_the_tokenize_stage_records_the_corpus_it_read(curated_shards, tokenized):
    _, _, run = tokenized
    digest, context, source = input_datasets(run)[lineage.CURATED_CORPUS]
    assert (digest, context) == (lineage.curated_corpus(curated_shards).digest, "training")
    assert json.loads(source) == {"uri": curated_shards.resolve().as_uri()}


def test_the_prior_previews_held_out_captions_at_every_checkpoint(tokenized, tmp_path, tracker, local_ray,
                                                                  frequent_system_metrics):
    """The prior trained on real tokens with the dVAE that made them: each preview caption is one image series
    with a picture at every checkpoint; the run records the token dataset it read and the machine's system
    metrics while it trained."""
    from dalle_pipeline.components.prior.train import PREVIEW_KEY, run as train_prior

    dvae_dir, dataset_dir, _ = tokenized
    cfg = PriorConfig(layers=1, d_model=32, heads=2, num_workers=1, checkpoint_every=4, preview_prompts=2,
                      val_fraction=0.1)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every, cfg.optim.warmup_steps = 8, 16, 4, 2
    train_prior(cfg, dataset_dir, tmp_path / "prior", seed=0, tracker=tracker, dvae_dir=dvae_dir)

    series = image_series(tracker)
    assert len(series) == 2 and all(key.startswith(f"{PREVIEW_KEY}-") for key in series), series
    assert all(steps == [0, 4, 8] for steps in series.values()), series  # from the untrained prior on
    digest, context, _ = input_datasets(tracker)[lineage.TOKEN_DATASET]
    assert (digest, context) == (lineage.token_dataset(dataset_dir).digest, "training")
    assert "system/cpu_utilization_percentage" in system_metrics(tracker)


def test_the_preview_draws_the_same_images_and_leaves_the_training_random_streams_alone(curated_shards, tokenized):
    """Drawing the preview between two updates must not shift the random numbers training draws next, or a
    run with a preview would not match one without, nor resume step-exactly."""
    from dalle_pipeline.components.prior.model import Prior
    from dalle_pipeline.components.prior.train import load_preview, model_config
    from dalle_pipeline.components.training import TokenParquet

    dvae_dir, dataset_dir, _ = tokenized
    dataset = TokenParquet(dataset_dir)
    preview = load_preview(dataset, torch.tensor([5, 70, 90]), str(dvae_dir), count=2, seed=0,
                           device=torch.device("cpu"))
    captions = [sample.caption for sample in iter_samples(curated_shards)]  # rows are in shard order
    assert preview.captions == [captions[5], captions[70]]
    prior = Prior(model_config(PriorConfig(layers=1, d_model=32, heads=2), dataset.manifest)).eval()

    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = preview.images(prior)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    assert (preview.images(prior) == first).all()


def test_a_dvae_that_did_not_make_the_tokens_is_refused_for_the_preview(tmp_path):
    from dalle_pipeline.components.prior.train import run as train_prior
    from dalle_pipeline.components.storage import write_json
    from dalle_pipeline.components.token_parquet import MANIFEST, schema

    dataset = tmp_path / "tokens"
    dataset.mkdir()
    meta = {"dvae_hash": "0" * 64, "tokenizer_hash": "t", "grid_size": "8", "image_vocab": "64", "text_vocab": "300"}
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"], "text_tokens": [[1]], "image_tokens": [[0] * 64]},
                            schema=schema(8, meta)), dataset / "00000.parquet")
    write_json(dataset / MANIFEST, {**meta, "rows": 1, "text_len": 24, "parts": [{"file": "00000.parquet", "rows": 1}]})
    with pytest.raises(ValueError, match=r"did not tokenize this dataset \(made by weights 000000000000\)"):
        train_prior(PriorConfig(layers=1, d_model=32, heads=2), dataset, tmp_path / "prior", seed=0,
                    dvae_dir=save_dvae(tmp_path / "dvae"))


def test_dvae_reconstructions_step_through_training(curated_shards, tmp_path, micro_config, tracker, local_ray,
                                                    frequent_system_metrics):
    from dalle_pipeline.components.dvae.train import RECONSTRUCTIONS_KEY, run

    cfg = micro_config.dvae.model_copy(deep=True)
    cfg.optim.steps, cfg.optim.log_every, cfg.recon_grid_every, cfg.checkpoint_every = 4, 2, 2, 4
    run(cfg, curated_shards, tmp_path / "dvae", micro_config.corpus.image_size, seed=0, tracker=tracker)

    assert image_series(tracker) == {RECONSTRUCTIONS_KEY: [0, 2, 4]}  # from the untrained dVAE on
    assert input_datasets(tracker)[lineage.CURATED_CORPUS][:2] == (lineage.curated_corpus(curated_shards).digest,
                                                                  "training")
    assert lineage.HELD_OUT_CORPUS not in input_datasets(tracker)  # the filter set nothing apart
    assert "system/system_memory_usage_megabytes" in system_metrics(tracker)


def test_clip_training_records_its_corpus_and_the_system(curated_shards, tmp_path, micro_config, tracker,
                                                         frequent_system_metrics):
    from dalle_pipeline.components.clip.train import run

    cfg = micro_config.clip.model_copy(deep=True)
    cfg.optim.steps, cfg.optim.warmup_steps = 10, 2
    run(cfg, curated_shards, tmp_path / "clip", micro_config.corpus.image_size, seed=0, tracker=tracker)

    assert input_datasets(tracker)[lineage.CURATED_CORPUS][:2] == (lineage.curated_corpus(curated_shards).digest,
                                                                  "training")
    assert "system/cpu_utilization_percentage" in system_metrics(tracker)


def test_the_monitor_stops_when_the_stage_raises(tracker, frequent_system_metrics, capfd):
    import threading

    with pytest.raises(RuntimeError, match="the stage failed"), tracker.system_metrics():
        assert any(thread.name == "SystemMetricsMonitor" for thread in threading.enumerate())
        raise RuntimeError("the stage failed")
    assert not any(thread.name == "SystemMetricsMonitor" for thread in threading.enumerate())
    out, err = capfd.readouterr()  # nor four INFO lines of MLflow's a stage, in the console
    assert "system metrics" not in out + err and "GPU metrics" not in out + err


def _copy_shards(source, target, count):
    samples = list(iter_samples(source))[:count]
    write_shard(target / "00000.tar", samples)
    return samples


def test_the_curated_corpus_digest_is_the_filter_stages_data_digest(curated_shards, tmp_path):
    """With the filter's report in the folder, the digest names the training samples (what the registered
    model is tagged with); without it, the shards' names and sizes. The held-out shards are another dataset."""
    curated = tmp_path / "curated"
    samples = _copy_shards(curated_shards, curated, 4)
    by_listing = lineage.curated_corpus(curated)
    assert by_listing.profile["shards"] == 1 and by_listing.profile["digest_of"] == "shard names and sizes"
    assert lineage.held_out_corpus(curated) is None

    rows = [{"key": s.key, "url": f"https://example.com/{s.key}.png", "stage": "filter", "kept": True,
             "reason": "kept", "sha256": f"{i:064x}"} for i, s in enumerate(samples)]
    report = pa.Table.from_pylist(rows + [{**rows[0], "key": "x", "url": "https://example.com/dropped.png",
                                           "kept": False, "reason": "too_small"}], schema=REPORT_SCHEMA)
    pq.write_table(report, curated / REPORT_NAME)
    assert lineage.curated_corpus(curated).digest == corpus_digest(report) != by_listing.digest

    write_shard(curated / HOLDOUT_DIR / "00000.tar", samples[:1])
    held_out = lineage.held_out_corpus(curated)
    assert held_out.name == lineage.HELD_OUT_CORPUS and held_out.source_uri.endswith(f"/{HOLDOUT_DIR}")
    assert held_out.digest != lineage.curated_corpus(curated).digest


def test_a_data_source_is_digested_by_its_files_or_its_url(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "urls.parquet").write_bytes(b"1234")
    folder = lineage.data_source(str(tmp_path / "source"))
    single = lineage.data_source(str(tmp_path / "source" / "urls.parquet"))
    assert folder.profile["files"] == single.profile["files"] == 1
    (tmp_path / "source" / "more.parquet").write_bytes(b"5")
    assert lineage.data_source(str(tmp_path / "source")).digest != folder.digest
    remote = lineage.data_source("https://example.com/urls.parquet")
    assert remote.source_uri == "https://example.com/urls.parquet" and len(remote.digest) == lineage.DIGEST_CHARS
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lineage.data_source(str(tmp_path / "nowhere"))


def test_the_registered_version_keeps_its_signature_input_example_and_description(bundle_dir, tmp_path, tracker):
    import mlflow.models
    import mlflow.pyfunc
    import pandas as pd

    from dalle_pipeline.components.register.run import MODEL_NAME, evaluation_fingerprint, model_requirements, register_version
    from dalle_pipeline.components.tracking import fluent_store

    prompts = ["a small red circle in the center", "a large blue square at the top"]
    metrics = {"oracle_colour_reranked": 0.625, "clip_score_reranked": 27.5, "fid_reranked": 80.25}
    registration = register_version(bundle_dir, metrics, prompts, tracker,
                       {"data_source": "shapes corpus", "data_digest": "0123456789abcdef"})

    uri = f"models:/{MODEL_NAME}/{registration.version}"
    with fluent_store(tracker.tracking_uri):
        info = mlflow.models.get_model_info(uri)
        model = mlflow.pyfunc.load_model(uri)
        # named, not inferred: no subprocess loaded the bundle and predicted on the example to find them
        requirements = open(mlflow.pyfunc.get_model_dependencies(uri)).read().split()
    assert requirements == model_requirements()
    inputs = {spec.name: (spec.type.name, spec.required) for spec in info.signature.inputs.inputs}
    assert inputs["prompt"] == ("string", False) and inputs["num_images"] == ("long", False)
    assert set(inputs) == {"prompt", "num_images", "seed", "temperature", "top_k", "top_p", "guidance_scale",
                           "prefix_rows", "image_png"}
    assert not any(required for _, required in inputs.values())
    assert info.signature.outputs.input_names() == ["prompt", "rank", "clip_score", "image_png"]
    assert info.saved_input_example_info is not None
    example = model.input_example
    assert list(example.columns) == ["prompt"] and example["prompt"].tolist() == prompts[:1]
    answer = model.predict(pd.DataFrame({"prompt": ["a red circle"]}))  # a prompt alone passes the signature
    assert list(answer.columns) == ["prompt", "rank", "clip_score", "image_png"] and len(answer) == 1

    description = tracker.client.get_model_version(MODEL_NAME, registration.version).description
    assert "shapes corpus (data digest 0123456789abcdef)" in description
    assert f"evaluation set {evaluation_fingerprint(prompts)} (2 prompts)" in description
    assert "oracle_colour_reranked 0.6250 (the primary metric)" in description
    assert "clip_score_reranked 27.5000" in description and "fid_reranked 80.2500" in description
