"""img2dataset with our fetch (`fetch.fetch`) in place of its own, and everything else its own.

img2dataset builds one `Downloader`, pickles it to each worker process (multiprocessing spawn or
Ray) and, per shard, calls the module-level `download_image_with_retry` from its download
threads. `PolicedDownloader` carries our `FetchPolicy` to the workers and, while it downloads a
shard, points that module-level name at our fetch. A worker process downloads one shard at a
time, so the swap is never seen by another shard. Importing this module imports img2dataset
(slow, about 4 s), so only the download stage does.
"""

from __future__ import annotations

import importlib
import io
import signal
from contextlib import contextmanager
from typing import Any

import img2dataset.downloader as i2d_downloader

# the package's `main` attribute is its CLI function, which hides the module of the same name
i2d_main = importlib.import_module("img2dataset.main")

from ..cluster import connect
from .fetch import FetchPolicy, fetch


class PolicedDownloader(i2d_downloader.Downloader):
    def __init__(self, *args: Any, policy: FetchPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def _fetch_row(self, row: tuple[int, str], **_img2dataset_arguments: Any) -> tuple[int, io.BytesIO | None, str | None]:
        key, url = row
        data, reason = fetch(url, self.policy, self.user_agent_token, frozenset(self.disallowed_header_directives or ()))
        return key, (None if data is None else io.BytesIO(data)), reason

    def download_shard(self, row: Any) -> None:
        original = i2d_downloader.download_image_with_retry
        i2d_downloader.download_image_with_retry = self._fetch_row
        try:
            super().download_shard(row)
        finally:
            i2d_downloader.download_image_with_retry = original


@contextmanager
def _policed(policy: FetchPolicy):
    """img2dataset's `download` builds a PolicedDownloader while inside this block."""
    original = i2d_main.Downloader
    i2d_main.Downloader = lambda **kwargs: PolicedDownloader(policy=policy, **kwargs)
    try:
        yield
    finally:
        i2d_main.Downloader = original


def download(arguments: dict[str, Any], policy: FetchPolicy, ray_address: str | None = None) -> None:
    """`img2dataset.download(**arguments)` with our fetch; puts back the SIGINT handler it installs.

    With `distributor="ray"` each shard is a Ray task: on the Ray session at `ray_address` (the one
    the caller has open), else the cluster at RAY_ADDRESS when set (its nodes need this package
    installed), else the pipeline's local Ray (`cluster.connect`).
    """
    if arguments["distributor"] == "ray":
        connect(ray_address)
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        with _policed(policy):
            i2d_main.download(**arguments)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
