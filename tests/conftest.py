"""Shared fixtures: small corpora built once per session with the real generator and stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalle_pipeline.components.environment import use_defaults

use_defaults()  # what the CLI sets for a run: no usage reports, a patient ephemeral Prefect server


@pytest.fixture(scope="session")
def micro_config():
    from dalle_pipeline.components.config import resolve

    return resolve("micro")


@pytest.fixture(scope="session")
def curated_shards(tmp_path_factory, micro_config) -> Path:
    """A small curated corpus as webdataset shards, written straight from the generator (no download)."""
    from dalle_pipeline.components.corpus.shapes import run as generate_corpus
    from dalle_pipeline.components.shards import Sample, write_shard
    import pyarrow.parquet as pq
    from urllib.parse import urlparse

    root = tmp_path_factory.mktemp("corpus")
    result = generate_corpus(micro_config.corpus.model_copy(update={"num_images": 96}), root / "corpus")
    table = pq.read_table(result.url_list).to_pylist()
    samples = [
        Sample(key=f"{i:09d}", image_bytes=Path(urlparse(row["url"]).path).read_bytes(), image_ext="png",
               caption=row["caption"], meta={"objects": row["objects"]})
        for i, row in enumerate(table)
    ]
    curated = root / "curated"
    write_shard(curated / "00000.tar", samples[:64])
    write_shard(curated / "00001.tar", samples[64:])
    return curated


@pytest.fixture
def local_ray():
    """A local Ray of 2 CPUs for one test; one a component started earlier is shut down first."""
    import ray

    from dalle_pipeline.components.cluster import disconnect

    disconnect()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)  # never one found
    yield
    ray.shutdown()
