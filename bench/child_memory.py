"""What a benchmark's child process measures of its own memory, and how its runs grow with their size.

A child started by `subprocess` measures itself: `peak_rss_mb` (VmHWM: `ru_maxrss` would carry over the
parent's peak across the exec that started it) and `AnonymousPeak` (RssAnon sampled: memory the process
owns, less the files it maps, which RSS counts though the kernel may drop them).
"""

from __future__ import annotations

import threading
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: ru_maxrss would carry the parent's peak
    over the exec that started it)."""
    return status_mb("VmHWM:")


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every `every_s` from its start to `stop`."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self.thread.start()

    def _sample(self, every_s: float) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, status_mb("RssAnon:"))
            self.done.wait(every_s)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, status_mb("RssAnon:"))


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, RssAnon...), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def growth(runs: dict[str, dict[int, dict]], unit: str) -> dict[str, dict[str, float]]:
    """Per mode, from its smallest size to its largest: the ratios of size and seconds, and how much each peak
    (`peak_rss_mb`, `peak_anonymous_mb`) grew."""
    ratios = {}
    for mode, by_size in runs.items():
        small, large = by_size[min(by_size)], by_size[max(by_size)]
        ratios[mode] = {unit: max(by_size) / min(by_size), "seconds": large["seconds"] / small["seconds"],
                        **{f"{peak}_growth_mb": large[f"{peak}_mb"] - small[f"{peak}_mb"]
                           for peak in ("peak_rss", "peak_anonymous")}}
    return ratios


def child_result(script: str, *arguments: str) -> dict:
    """`python script --child ARGUMENTS` in a fresh process, whose memory is then its own; the JSON object its
    last line printed."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, script, "--child", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit_runs(benchmark: str, runs: dict[str, dict[int, dict]], unit: str, out: str | None) -> dict:
    """A benchmark's JSON (printed, and written to `out`): the CPU, every run by mode and size, and per mode
    the growth from the smallest size to the largest (`growth`)."""
    import platform

    import torch
    from common import device_name, emit

    return emit({"benchmark": benchmark, "cpu": device_name(torch.device("cpu")), "machine": platform.machine(),
                 "runs": {mode: {str(size): run for size, run in by_size.items()} for mode, by_size in runs.items()},
                 "ratios_largest_to_smallest": growth(runs, unit)}, out)
