"""The prior on a two-node Ray cluster: `ray start --head`, a second `ray start --address` on this
machine, one CPU each, so the two training workers can only run one on each node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_processes import NO_AUTH, ray_cli, start_ray_head, stop_ray_cluster, without_folder
from test_prior_train import write_learnable_dataset


def local_cluster(monkeypatch, name: str, head_cpus: int, node_cpus: list[int], hidden: Path | None = None):
    """`ray start --head` and a `ray start --address` per node, all on this machine with logical CPUs (the nodes
    but the head without the folder `hidden`: `without_folder`); yields the head's address and stops every node
    after."""
    for variable, value in NO_AUTH.items():
        monkeypatch.setenv(variable, value)
    cluster, address = f"{name}-{os.getpid()}", None
    try:
        address = start_ray_head(cluster, num_cpus=head_cpus)
        for cpus in node_cpus:
            worker = ray_cli("start", f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                             cluster=cluster, wrapper=without_folder(hidden) if hidden else ())
            assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address
    finally:
        stop_ray_cluster(cluster, address or "")  # every node; later tests start their own local Ray


@pytest.fixture
def two_node_cluster(monkeypatch):
    yield from local_cluster(monkeypatch, "two-nodes", 1, [1])


DRIVER = """
import json, sys
import ray
from dalle_pipeline.components.config import PriorConfig
from dalle_pipeline.components.prior.model import load
from dalle_pipeline.components.prior.train import run

address, dataset, out = sys.argv[1:]
ray.init(address=address, include_dashboard=False, configure_logging=False)
nodes = [node for node in ray.nodes() if node["Alive"]]
cfg = PriorConfig(layers=2, d_model=32, heads=2, num_workers=2, caption_dropout=0.0, checkpoint_every=30)
cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.log_every = 60, 32, 3e-3, 10
result = run(cfg, dataset, out, seed=0)
print("RESULT " + json.dumps({"cpus_per_node": [node["Resources"].get("CPU") for node in nodes],
                              "metrics": result.metrics, "layers": load(result.checkpoint_dir).cfg.layers}))
"""


@pytest.mark.slow  # two-node Ray
def test_the_prior_trains_across_both_nodes(tmp_path, two_node_cluster):
    dataset = write_learnable_dataset(tmp_path / "tokens")
    # the driver in its own process, as a pipeline run on a cluster has it (and clear of this process's Ray)
    proc = subprocess.run([sys.executable, "-c", DRIVER, two_node_cluster, str(dataset), str(tmp_path / "prior")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **NO_AUTH})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # two nodes of one CPU; each worker needs a whole CPU, so the run finishes only with one on each node
    assert result["cpus_per_node"] == [1.0, 1.0]
    assert result["metrics"]["step"] == 60
    assert result["metrics"]["val_image_loss"] < 2.5  # chance over 32 image codes is ln 32 = 3.47
    assert result["layers"] == 2


def test_a_local_dashboard_listens_on_loopback_only(monkeypatch, capsys):
    import psutil
    import ray

    from dalle_pipeline.components.cluster import connect, disconnect

    monkeypatch.setenv("DALLE_RAY_DASHBOARD", "1")
    disconnect()
    try:
        connect()
        url = ray.get_runtime_context().worker.node.address_info["webui_url"]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        listening = {conn.laddr.ip for conn in psutil.net_connections("inet")
                     if conn.status == psutil.CONN_LISTEN and conn.laddr.port == int(port)}
    finally:
        disconnect()
    assert host == "127.0.0.1" and listening == {"127.0.0.1"}, (url, listening)
    assert f"Ray dashboard: http://127.0.0.1:{port}" in capsys.readouterr().out


def test_a_workers_cpus_are_what_it_finds_on_one_node_and_missing_gpus_are_an_error():
    from dalle_pipeline.components.training.ray_train import worker_shares

    # a head of 6 CPUs and two nodes of 2: two workers of 3 fit (on the head); the cluster's 10 / 2 = 5 fit once
    assert worker_shares([{"CPU": 6}, {"CPU": 2}, {"CPU": 2}], 2) == (False, 3)
    assert worker_shares([{"CPU": 6}, {"CPU": 2}, {"CPU": 2}], 4) == (False, 2)
    assert worker_shares([{"CPU": 2}], 1) == (False, 2) and worker_shares([{"CPU": 2}], 2) == (False, 1)
    # an 8-CPU head without GPUs and two 8-CPU nodes of a GPU each: a worker per GPU, 8 CPUs each (not 12)
    cluster = [{"CPU": 8}, {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    assert worker_shares(cluster, 2) == (True, 8)
    with pytest.raises(ValueError, match=r"3 GPU workers, but the Ray cluster has 2 GPU\(s\).*device='cpu'"):
        worker_shares(cluster, 3)
    assert worker_shares(cluster, 3, device="cpu") == (False, 8)
    with pytest.raises(ValueError, match=r"1 GPU workers, but the Ray cluster has 0 GPU"):
        worker_shares([{"CPU": 4}], 1, device="gpu")


@pytest.fixture
def uneven_cluster(monkeypatch):
    """A head of 6 logical CPUs and two nodes of 2."""
    yield from local_cluster(monkeypatch, "uneven", 6, [2, 2])


@pytest.mark.slow  # a three-node Ray
def test_two_workers_schedule_on_a_cluster_whose_total_share_fits_no_node(tmp_path, uneven_cluster):
    dataset = write_learnable_dataset(tmp_path / "tokens")
    driver = DRIVER.replace("cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.log_every = 60, 32, 3e-3, 10",
                            "cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.log_every = 10, 16, 3e-3, 5")
    proc = subprocess.run([sys.executable, "-c", driver, uneven_cluster, str(dataset), str(tmp_path / "prior")],
                          capture_output=True, text=True, timeout=400, env={**os.environ, **NO_AUTH})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert sorted(result["cpus_per_node"]) == [2.0, 2.0, 6.0] and result["metrics"]["step"] == 10
