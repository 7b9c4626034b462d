"""The Prefect server on PostgreSQL, as a user points it there: `PREFECT_DATABASE_URL=... infra/serve.sh`.

A throwaway PostgreSQL cluster (initdb into a temporary folder, TCP on 127.0.0.1 only, a free port,
password logins, no Unix socket) holds a database owned by an ordinary role, as the README tells a
user to create it. serve.sh starts the Prefect server, the MLflow server and the worker on it under
a temporary DALLE_HOME and free ports; a small flow runs against that server, and psql finds the
run, the deployments and the worker in PostgreSQL's tables. Everything is stopped even on failure.

PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` system user (the
Debian package's), else as `nobody`; its folder is then made with mkdtemp under /tmp, because
pytest's own temporary root is private to the user running the tests.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_processes import free_port, processes_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # real servers, minutes each

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SERVE_TIMEOUT_S = 300  # three services at up to ~40 s each on 2 busy cores, plus `prefect deploy`
DATABASE = "prefect"
ROLE = "prefect"  # owns the database, not a superuser: what the README asks a user to create

if sys.platform != "linux" or shutil.which("setsid") is None or shutil.which("curl") is None:
    pytest.skip("infra/serve.sh needs Linux with setsid and curl", allow_module_level=True)


def _postgres_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: PATH's, else the newest Debian one."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).parent] if on_path else []
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


BINDIR = _postgres_bindir()
if BINDIR is None:
    pytest.skip(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres on PATH or in /usr/lib/postgresql/*/bin);"
        " `apt-get install postgresql` to run this test",
        allow_module_level=True,
    )
PSQL = str(BINDIR / "psql") if (BINDIR / "psql").is_file() else shutil.which("psql")


@dataclass
class Postgres:
    """A running throwaway cluster; `url` is the Prefect database's, as serve.sh takes it."""

    port: int
    superuser: str
    password: str
    log: Path

    def url(self, *, port: int | None = None, password: str | None = None) -> str:
        return (f"postgresql+asyncpg://{ROLE}:{password or self.password}"
                f"@127.0.0.1:{port or self.port}/{DATABASE}")

    def psql(self, sql: str, database: str = DATABASE) -> list[list[str]]:
        """Rows of `sql`, run by psql over TCP as the superuser."""
        done = subprocess.run(
            [PSQL, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, "-d", database,
             "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env={"PATH": os.environ.get("PATH", ""), "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"},
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, f"psql failed on {sql!r}:\n{done.stderr}"
        return [line.split("\t") for line in done.stdout.splitlines() if line]


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    as_root = os.geteuid() == 0
    owner = None
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = pwd.getpwnam("nobody")
    run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}

    cluster = Path(tempfile.mkdtemp(prefix="dalle-pg-"))
    data, log, pwfile = cluster / "data", cluster / "postgres.log", cluster / "password"
    password = secrets.token_urlsafe(16)
    pwfile.write_text(password + "\n")
    if owner:
        os.chown(cluster, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    pg_env = {"PATH": os.environ.get("PATH", ""), "LANG": "C", "LC_ALL": "C"}

    def as_owner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BINDIR / args[0]), *args[1:]], env=pg_env, cwd=cluster,
                              capture_output=True, text=True, timeout=timeout, **run_as)

    superuser = "dalle_admin"
    port = free_port()
    started = False
    try:
        init = as_owner("initdb", "-D", str(data), "-U", superuser, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        # Loopback TCP only, no Unix socket (its default folder may not exist or not be ours), and
        # none of the durability a throwaway cluster does not need.
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        start = as_owner("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        started = True
        server_log = log.read_text() if log.exists() else ""
        assert start.returncode == 0, f"pg_ctl start failed:\n{start.stderr}\n{server_log}"
        server = Postgres(port=port, superuser=superuser, password=password, log=log)
        server.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'", database="postgres")
        server.psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}", database="postgres")
        yield server
    finally:
        if started:
            stop = as_owner("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
            if stop.returncode != 0 and (data / "postmaster.pid").exists():
                as_owner("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(cluster, ignore_errors=True)


def _serve_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        DALLE_HOME=str(tmp_path / "home"),
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        PREFECT_POOL="dalle-pg",
        PREFECT_DATABASE_URL=database_url,
    )
    # The scripts use the virtualenv running this test when it has the CLIs, else <repo>/.venv.
    if (Path(sys.prefix) / "bin" / "prefect").exists():
        env["VENV"] = sys.prefix
    return env


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INFRA / "serve.sh")], env=env, capture_output=True, text=True,
                          timeout=SERVE_TIMEOUT_S)


# A small real flow, run by the user's Python against the served API: one task, one result.
SMALL_FLOW = """
from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow(name="postgres-smoke")
def smoke(x: int) -> int:
    return double(x)

state = smoke(21, return_state=True)
print("flow run", state.state_details.flow_run_id, state.type.value, state.result())
"""


def test_served_prefect_server_stores_its_runs_in_postgres(postgres: Postgres, tmp_path: Path) -> None:
    # Before anything starts, serve.sh checks the database and names it without the password.
    for bad_url, reason in [(postgres.url(port=free_port()), "ConnectionRefusedError"),
                            (postgres.url(password="not-" + postgres.password), "InvalidPasswordError")]:
        env = _serve_env(tmp_path / "bad", bad_url)
        refused = _serve(env)
        message = refused.stdout + refused.stderr
        assert refused.returncode != 0, message
        shown = re.sub(r":[^:@/]+@", ":***@", bad_url)
        assert f"cannot log in to the Prefect server's database {shown} ({reason}" in message, message
        assert postgres.password not in message
        assert not list(Path(env["DALLE_HOME"], "pids").glob("*.pid")), "serve.sh started a service anyway"

    env = _serve_env(tmp_path, postgres.url())
    home = Path(env["DALLE_HOME"])
    try:
        started = time.monotonic()
        served = _serve(env)
        assert served.returncode == 0, f"serve.sh failed:\n{served.stdout}\n{served.stderr}"
        print(f"serve.sh on PostgreSQL took {time.monotonic() - started:.0f}s\n{served.stderr}")
        assert f"(database {postgres.url().replace(postgres.password, '***')})" in served.stdout

        flow_env = {k: v for k, v in env.items() if k != "PREFECT_DATABASE_URL"}
        flow_env.update(PREFECT_API_URL=f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
                        PREFECT_HOME=str(home / "prefect"))
        ran = subprocess.run([sys.executable, "-c", SMALL_FLOW], env=flow_env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, f"the flow failed:\n{ran.stdout}\n{ran.stderr}"
        match = re.search(r"flow run ([0-9a-f-]{36}) COMPLETED 42", ran.stdout)
        assert match, ran.stdout
        flow_run_id = match.group(1)

        # The server kept it all in PostgreSQL, and made no SQLite database of its own.
        assert postgres.psql(
            "SELECT f.name, r.state_type, r.parameters->>'x' FROM flow_run r JOIN flow f ON f.id = r.flow_id"
            f" WHERE r.id = '{flow_run_id}'"
        ) == [["postgres-smoke", "COMPLETED", "21"]]
        assert postgres.psql(
            "SELECT state_type, count(*) FROM task_run"
            f" WHERE flow_run_id = '{flow_run_id}' GROUP BY state_type"
        ) == [["COMPLETED", "1"]]
        assert sorted(row[0] for row in postgres.psql("SELECT name FROM deployment")) == ["full", "retrain", "watch"]
        assert postgres.psql("SELECT w.name FROM worker w JOIN work_pool p ON p.id = w.work_pool_id"
                             " WHERE p.name = 'dalle-pg'") == [["dalle-worker"]]
        assert not (home / "prefect" / "prefect.db").exists()

        # The password reached the server alone: not its command line, not a log, not the other services.
        for log in (home / "logs").glob("*.log"):
            assert postgres.password not in log.read_text(errors="replace"), f"password written to {log}"
        for service in ("mlflow-server", "prefect-worker"):
            pid = (home / "pids" / f"{service}.pid").read_text().strip()
            assert postgres.password.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), service

        stopped = subprocess.run(["bash", str(INFRA / "stop.sh")], env=env, capture_output=True, text=True,
                                 timeout=180)
        assert stopped.returncode == 0, f"stop.sh failed:\n{stopped.stdout}\n{stopped.stderr}"
        assert not processes_with_env("DALLE_HOME", str(home)), "processes left running after stop.sh"
    finally:
        try:  # idempotent: a no-op when the test stopped everything already
            subprocess.run(["bash", str(INFRA / "stop.sh")], env=env, capture_output=True, timeout=180)
        except subprocess.TimeoutExpired:
            pass
        for pid in processes_with_env("DALLE_HOME", str(home)):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
