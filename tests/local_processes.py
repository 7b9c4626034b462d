"""Helpers of the tests that start servers and clusters on this machine: free ports, their processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.60's `ray start --head` asks joining nodes for an auth token it keeps in ~/.ray; a loopback test
# cluster does without (a driver joining it too, through its environment)
NO_AUTH = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of this user's processes started with `name=value` in their environment."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


CLUSTER_MARK = "DALLE_TEST_RAY_CLUSTER"  # in the environment of every process of a test's own Ray cluster


def ray_cli(*args: str, cluster: str | None = None, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The `ray` command of this environment (run by `wrapper`, a command that takes one), without token auth;
    `cluster` marks what it starts."""
    env = {**os.environ, **NO_AUTH, **({CLUSTER_MARK: cluster} if cluster else {})}
    return subprocess.run([*wrapper, RAY, *args], env=env, capture_output=True, text=True, timeout=180)


def without_folder(folder: Path) -> tuple[str, ...]:
    """A wrapper command (`ray_cli`'s) that runs its command where `folder` is an empty one: in mount and user
    namespaces of its own (`unshare`), an empty tmpfs mounted over it, as on a machine without that disk."""
    return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
            str(folder))


def namespaces_allowed() -> bool:
    """Whether this machine lets a user mount a tmpfs in namespaces of its own (`without_folder`)."""
    try:
        probe = subprocess.run([*without_folder(Path("/mnt")), "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def start_ray_head(cluster: str, num_cpus: int = 1) -> str:
    """`ray start --head` on a free loopback port, its processes marked `cluster`; its address."""
    address = f"127.0.0.1:{free_port()}"
    head = ray_cli("start", "--head", f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats", cluster=cluster)
    assert head.returncode == 0, head.stdout + head.stderr
    return address


def stop_ray_cluster(cluster: str, address: str, grace: float = 10.0) -> None:
    """End the processes of the Ray cluster marked `cluster` (head at `address`), and nothing else:
    `ray stop` would also end every other Ray of this user, the test process's own session included
    (its driver then exits). The address file `ray start` left for `ray.init()` to discover goes too."""
    import signal
    import time

    from ray._private.utils import get_ray_address_file, read_ray_address

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_env(CLUSTER_MARK, cluster):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_with_env(CLUSTER_MARK, cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
    written = read_ray_address()
    if written and written.rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1]:
        Path(get_ray_address_file(None)).unlink(missing_ok=True)


def forget_s3_clients() -> None:
    """fsspec keeps one S3 file system per set of options, made with the endpoint of the environment of that
    time: a test's endpoint must not reach the next test's (another port)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class S3Endpoint:
    """moto's standalone S3 server on a loopback port (as s3fs's own tests run it), with a bucket; `env` is what
    a process needs to reach it through the usual boto/s3fs configuration."""

    def __init__(self, bucket: str = "dalle-test") -> None:
        self.bucket, self.port = bucket, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url,
                    "MLFLOW_S3_ENDPOINT_URL": self.url}
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                         "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        import time
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer on {self.url}")
                time.sleep(0.2)
        self.client().create_bucket(Bucket=bucket)
        forget_s3_clients()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        forget_s3_clients()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
