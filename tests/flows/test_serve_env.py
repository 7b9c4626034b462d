"""`make serve`'s settings (infra/env.sh) for each kind of root: a local folder, and an object store, whose URL
stays the flows' root while the services' own files go to its local cache (no local folder named `s3:`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHOWN = ("ROOT", "DALLE_HOME", "MLFLOW_ARTIFACTS", "MLFLOW_BACKEND_URI", "PREFECT_HOME", "LOG_DIR")


def settings(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    script = 'source "$1" && for name in ' + " ".join(SHOWN) + '; do echo "$name=${!name}"; done'
    return subprocess.run(["bash", "-c", script, "env.sh", str(REPO / "infra" / "env.sh")], cwd=cwd, text=True,
                          capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env}, timeout=120)


def shown(done: subprocess.CompletedProcess) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def test_a_store_root_keeps_its_url_and_the_services_files_in_its_cache(tmp_path):
    on_store = shown(settings(tmp_path, DALLE_HOME="s3://bucket/dalle/", DALLE_CACHE=str(tmp_path / "cache")))
    cache = str(tmp_path / "cache")
    assert on_store == {"ROOT": cache, "DALLE_HOME": "s3://bucket/dalle",
                        "MLFLOW_ARTIFACTS": "s3://bucket/dalle/mlartifacts",
                        "MLFLOW_BACKEND_URI": f"sqlite:///{cache}/mlflow.db", "PREFECT_HOME": f"{cache}/prefect",
                        "LOG_DIR": f"{cache}/logs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing named s3: where it was called

    local = shown(settings(tmp_path, DALLE_HOME="runs"))
    assert local["ROOT"] == local["DALLE_HOME"] == str(tmp_path / "runs")
    assert local["MLFLOW_ARTIFACTS"] == f"{tmp_path}/runs/mlartifacts"
    assert shown(settings(tmp_path, DALLE_HOME=f"file://{tmp_path}/runs"))["ROOT"] == str(tmp_path / "runs")

    refused = settings(tmp_path, DALLE_HOME="nosuch://bucket/dalle")
    assert refused.returncode != 0 and "infra/env.sh: DALLE_HOME 'nosuch://bucket/dalle': unknown protocol nosuch://" \
        in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]

    ui = subprocess.run(["make", "-s", "ui", "DALLE_HOME=s3://bucket/dalle"], cwd=REPO, text=True,
                        capture_output=True, timeout=60)
    assert ui.returncode != 0 and "the root s3://bucket/dalle is an object store; make serve starts" in ui.stderr
