"""The data stages as the corpus grows: seconds, items/s and the peak memory of the process tree per N (#29).

A synthetic corpus of N captioned 256x256 JPEGs (a random low-frequency colour field, 2-5 random
rectangles and ellipses and a light per-pixel noise per image, deterministic from `--seed` and the
image's index: no two share a pHash within a few bits, nor a sha256) as a folder of webdataset
shards (`<key>.jpg`, `<key>.txt`, `<key>.json`) goes through the pipeline's own stages, each N in a
fresh child process (so each N's peak memory is its own):

- ingest: `sources.ingest.run` (data.source the shards, `holdout_fraction` 0.01, DownloadConfig defaults);
- filter: `filter.run.run` with `near_duplicate_distance` 4 (pHashes computed and searched);
- text-tokenizer: `text.tokenizer.run` (TokenizerConfig defaults) on the curated captions;
- dvae: `dvae.train.run`, the micro preset's dVAE at 256 px for its 30 updates (or `--steps`) on Ray Train, its images
  read as `--image-data` says (`auto`: in memory up to 1 GiB of decoded pixels, streamed past it);
- tokenize-corpus: `tokenize_corpus.run.run` with that dVAE (without the dvae stage, the micro
  preset's dVAE randomly initialised and saved by `checkpoint.save`: its speed is what is measured);
- prior: `prior.train.run`, the micro preset's prior for its 30 updates (or `--steps`, validated halfway and at
  the end) on the token Parquet.

The training stages' items/s is the corpus size over their seconds: their work is a fixed number of
updates, so what they show as the corpus grows is their memory (the whole flow's peak PSS at 4N at
most 256 MB above N: #30).

The child connects a local Ray on every core first (`cluster.connect`), so the stages that run
their per-shard work as Ray tasks do; `--no-ray` leaves it out (tokenize-corpus, built on Ray
Data, then starts one itself, inside its own timing). A background thread samples the PSS (and
RSS) of the child and all its descendants (Ray's gcs, raylet and workers) every `--interval`
seconds with psutil; peaks are kept per stage and overall, each with the PSS of every process role
(driver, Ray workers, raylet, gcs_server, ...) at that peak, and the scaling summary says which
roles grew from the smallest N to the largest.

The corpus is cached under `--cache-dir` by seed and shard size, shard by shard (the images of a
shard depend only on the seed and their index, so 160k reuses 40k's shards; a shard is written
atomically, so an interrupted generation resumes), and generated on every core.

    python bench/scale.py                                   # N = 10k, 40k, 160k
    python bench/scale.py --sizes 1000 4000 --stages ingest,filter --no-ray

Prints one JSON document (and writes it to `--out`): per N and stage seconds, items/s and peak
PSS; for each stage items/s at the largest N over the smallest, the peak-PSS difference and its
growth per item; and an extrapolation to 100M images on 16 nodes of this machine's cores.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from common import device_name, emit

STAGES = ("ingest", "filter", "text-tokenizer", "dvae", "tokenize-corpus", "prior")
NEEDS = {"ingest": (), "filter": ("ingest",), "text-tokenizer": ("filter",), "dvae": ("filter",),
         "tokenize-corpus": ("filter", "text-tokenizer"), "prior": ("tokenize-corpus",)}
GENERATOR_VERSION = 1  # bump when the images or captions change: the cache is keyed by it
MB = 2**20
TARGET_IMAGES, TARGET_NODES = 100_000_000, 16
EXTRAPOLATION = (
    "linear scaling: each stage's core-seconds per item at the largest N (its wall seconds x the cores the run "
    "had, as if it kept every one busy) stay the same at 100M images, spread evenly over 16 nodes of as many "
    "cores of this kind; no per-item cost growth with N (see items_per_s_ratio), no network or shared-storage "
    "cost, and no serial part (the filter's driver gives the duplicate verdicts in corpus order, its index split "
    "over the nodes: bench/near_duplicates.py --partitions; the tokenize-corpus driver runs on one node)")


# the corpus ---------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 60, 210), "yellow": (235, 210, 40),
           "purple": (130, 40, 160), "orange": (240, 130, 20), "white": (245, 245, 245), "black": (15, 15, 15),
           "grey": (128, 128, 128), "pink": (240, 150, 190), "brown": (120, 70, 30), "teal": (20, 140, 140)}
SIZES = ("tiny", "small", "large", "huge")
PLACES = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
SCENES = ("on a blurry background", "over a colourful backdrop", "in an abstract picture", "on a noisy canvas",
          "in a photo", "in a painting", "on a poster", "in a sketch")


def synthetic_sample(index: int, seed: int, size: int):
    """Sample `index` of the corpus: a JPEG whose low frequencies (what the pHash reads) are a random 8x8
    colour field, 2-5 random shapes on it, a light per-pixel noise; a caption naming the shapes."""
    from PIL import Image, ImageDraw

    from dalle_pipeline.components.shards import Sample

    rng = np.random.default_rng((seed, index))
    field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    names, phrases = list(COLOURS), []
    for _ in range(int(rng.integers(2, 6))):
        width, height = (int(v) for v in rng.integers(size // 16, size // 2, 2))
        left, top = int(rng.integers(0, size - width)), int(rng.integers(0, size - height))
        colour = names[int(rng.integers(len(names)))]
        shape = "rectangle" if rng.random() < 0.5 else "ellipse"
        getattr(draw, shape)([left, top, left + width, top + height], fill=COLOURS[colour])
        where = PLACES[min(2, 3 * (left + width // 2) // size) + 3 * min(2, 3 * (top + height // 2) // size)]
        scale = SIZES[min(3, 4 * max(width, height) // size)]
        phrases.append(f"a {scale} {colour} {shape} at the {where}")
    noise = rng.integers(-6, 7, (size, size, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    caption = ", ".join(phrases[:-1]) + f" and {phrases[-1]} " + SCENES[int(rng.integers(len(SCENES)))]
    return Sample(key=f"{index:09d}", image_bytes=buffer.getvalue(), image_ext="jpg", caption=caption)


def _pool_dir(args: argparse.Namespace) -> Path:
    name = f"seed{args.seed}-shard{args.shard_size}-{args.image_size}px-v{GENERATOR_VERSION}"
    return Path(args.cache_dir).expanduser() / name


def _pool_name(shard: int, count: int, shard_size: int) -> str:
    return f"{shard:05d}.tar" if count == shard_size else f"{shard:05d}-{count}.tar"


def _write_pool_shard(job: tuple[Path, int, int, int, int, int]) -> int:
    from dalle_pipeline.components.shards import write_shard

    pool, shard, count, shard_size, seed, size = job
    first = shard * shard_size
    return write_shard(pool / _pool_name(shard, count, shard_size),
                       (synthetic_sample(index, seed, size) for index in range(first, first + count)))


def corpus(size: int, args: argparse.Namespace) -> tuple[Path, dict]:
    """The folder of `size` samples' shards (links into the cached pool), generating the pool's missing shards."""
    pool = _pool_dir(args)
    pool.mkdir(parents=True, exist_ok=True)
    shards = [(shard, min(args.shard_size, size - shard * args.shard_size))
              for shard in range(-(-size // args.shard_size))]
    missing = [(pool, shard, count, args.shard_size, args.seed, args.image_size) for shard, count in shards
               if not (pool / _pool_name(shard, count, args.shard_size)).is_file()]
    started = time.perf_counter()
    if missing:
        print(f"scale: generating {len(missing)} shards of {args.shard_size} images into {pool}", file=sys.stderr,
              flush=True)
        workers = max(1, min(args.workers, len(missing)))
        if workers == 1:
            for job in missing:
                _write_pool_shard(job)
        else:
            with multiprocessing.get_context("fork").Pool(workers) as processes:
                for _ in processes.imap_unordered(_write_pool_shard, missing):
                    pass
    generated = time.perf_counter() - started
    folder = pool.parent / f"{pool.name}-n{size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    total = 0
    for shard, count in shards:
        source = pool / _pool_name(shard, count, args.shard_size)
        try:
            os.link(source, folder / f"{shard:05d}.tar")
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(source, folder / f"{shard:05d}.tar")
        total += source.stat().st_size
    return folder, {"path": str(folder), "shards": len(shards), "bytes": total,
                    "generated_shards": len(missing), "generation_seconds": generated}


# the process tree's memory ----------------------------------------------------------------------


class TreeMemory:
    """Peak PSS and RSS sums over this process and all its descendants, sampled every `interval`
    seconds by a daemon thread (and at each stage's start and end), kept overall and per stage."""

    def __init__(self, interval: float):
        self.interval = interval
        self.root = psutil.Process()
        self.lock = threading.Lock()
        self.stage: str | None = None
        self.peaks: dict[str, dict[str, float]] = {}
        self.overall = {"pss": 0.0, "rss": 0.0, "processes": 0}
        # PSS by process role at the overall peak, and of it the part mapped from files (page cache: spilled index
        # runs read through mmap, shared libraries), which the kernel takes back under pressure
        self.overall_roles: dict[str, int] = {}
        self.overall_file_roles: dict[str, int] = {}
        self.peak_roles: dict[str, dict[str, int]] = {}  # the same at each stage's peak
        self.peak_file_roles: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def measure(self) -> tuple[int, int, int, dict[str, int], dict[str, int]]:
        """(PSS, RSS, processes, PSS by role, file-backed PSS by role) now; a process that ends or refuses while
        being read is left out."""
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            processes = [self.root]
        pss = rss = counted = 0
        by_role: dict[str, int] = {}
        file_by_role: dict[str, int] = {}
        for process in processes:
            try:
                info = process.memory_full_info()
                role = "driver" if process is self.root else process_role(process)
                file_backed = pss_file(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += info.pss
            rss += info.rss
            counted += 1
            by_role[role] = by_role.get(role, 0) + info.pss
            file_by_role[role] = file_by_role.get(role, 0) + file_backed
        return pss, rss, counted, by_role, file_by_role

    def sample(self) -> None:
        pss, rss, counted, by_role, file_by_role = self.measure()
        with self.lock:
            self.samples += 1
            if pss > self.overall["pss"]:
                self.overall_roles, self.overall_file_roles = by_role, file_by_role
            self.overall = {"pss": max(self.overall["pss"], pss), "rss": max(self.overall["rss"], rss),
                            "processes": max(self.overall["processes"], counted)}
            if self.stage is not None:
                peak = self.peaks.setdefault(self.stage, {"pss": 0.0, "rss": 0.0, "processes": 0})
                if pss > peak["pss"]:
                    self.peak_roles[self.stage], self.peak_file_roles[self.stage] = by_role, file_by_role
                peak.update(pss=max(peak["pss"], pss), rss=max(peak["rss"], rss),
                            processes=max(peak["processes"], counted))

    @contextmanager
    def during(self, stage: str):
        with self.lock:
            self.stage = stage
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self.lock:
                self.stage = None

    def report(self, peak: dict[str, float], roles: dict[str, int], file_roles: dict[str, int]) -> dict:
        return {"peak_pss_mb": peak["pss"] / MB, "peak_rss_sum_mb": peak["rss"] / MB,
                "peak_processes": peak["processes"],
                "peak_pss_mb_by_role": {role: pss / MB for role, pss in sorted(roles.items())},
                "peak_pss_file_mb_by_role": {role: pss / MB for role, pss in sorted(file_roles.items())}}


def pss_file(pid: int) -> int:
    """The file-backed part of a process's PSS in bytes (smaps_rollup's Pss_File); 0 where the kernel has none or
    will not give it (smaps_rollup refuses some live processes, which psutil then measures from smaps: such a
    process is still counted in the PSS, its file-backed part not)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss_File:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_role(process: psutil.Process) -> str:
    """What a descendant of the child is: a Ray worker (`ray::<task or actor>`, as Ray names them), one
    of Ray's daemons by its executable or script, or `other`."""
    name = process.name()
    if name.startswith("ray::"):
        return "ray worker"
    command = " ".join(process.cmdline()[:3])
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if daemon in name or daemon in command:
            return f"ray {daemon.removesuffix('.py')}"
    if "default_worker.py" in command or command.startswith("ray::"):
        return "ray worker"
    return "other"


# one N, in a child process ------------------------------------------------------------------------


def run_stages(job: dict) -> dict:
    """The child's work: the stages in order on the corpus at `job['source']`, each timed and its memory sampled."""
    with TreeMemory(job["interval"]) as memory:
        result = _run_stages(job, memory)
        result["peak"] = memory.report(memory.overall, memory.overall_roles, memory.overall_file_roles)
        result["memory_samples"] = memory.samples
        for stage, row in result["stages"].items():
            row.update(memory.report(memory.peaks[stage], memory.peak_roles.get(stage, {}),
                                     memory.peak_file_roles.get(stage, {})))
    return result


def _run_stages(job: dict, memory: TreeMemory) -> dict:
    import torch

    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.cluster import connect, disconnect
    from dalle_pipeline.components.config import DataConfig, DownloadConfig, FilterConfig, TokenizerConfig, resolve
    from dalle_pipeline.components.dvae.model import DiscreteVAE
    from dalle_pipeline.components.dvae.train import model_config

    work, size, image_size = Path(job["work"]), job["size"], job["image_size"]
    result: dict = {"items": size, "stages": {}}

    def steps(stage: str) -> dict:
        return {f"{stage}.optim.steps": job["steps"]} if job.get("steps") else {}

    started = time.perf_counter()
    result["cluster"] = {"cpus": connect()["CPU"]} if job["ray"] else None
    result["ray_start_seconds"] = time.perf_counter() - started if job["ray"] else None
    pss, rss, processes, roles, _ = memory.measure()  # before the first stage (Ray started, modules imported)
    result["before_stages"] = {"pss_mb": pss / MB, "rss_sum_mb": rss / MB, "processes": processes,
                               "pss_mb_by_role": {role: value / MB for role, value in sorted(roles.items())}}
    data = DataConfig(source=job["source"], holdout_fraction=job["holdout_fraction"])
    outputs: dict = {}

    def timed(stage: str, items: int, call) -> None:
        with memory.during(stage):
            start = time.perf_counter()
            outputs[stage] = call()
            seconds = time.perf_counter() - start
        result["stages"][stage] = {"items": items, "seconds": seconds, "items_per_s": items / seconds,
                                   "measured": stage in job["stages"]}

    try:
        if "ingest" in job["run"]:
            from dalle_pipeline.components.sources.ingest import run as ingest

            timed("ingest", size, lambda: ingest(data, DownloadConfig(), work / "ingested", image_size))
            ingested = outputs["ingest"]
            result["stages"]["ingest"].update(successes=ingested.successes, failures=dict(ingested.failures_by_reason),
                                              nodes=len(getattr(ingested, "shards_by_node", {})))
        if "filter" in job["run"]:
            from dalle_pipeline.components.filter.run import run as curate

            cfg = FilterConfig(near_duplicate_distance=job["near_duplicate_distance"])
            timed("filter", size, lambda: curate(cfg, work / "ingested", work / "curated", data.holdout_fraction))
            filtered = outputs["filter"]
            result["stages"]["filter"].update(kept=filtered.kept, held_out=filtered.held_out,
                                              dropped=dict(filtered.dropped_by_reason),
                                              nodes=len(getattr(filtered, "shards_by_node", {})))
        curated_items = outputs["filter"].kept if "filter" in outputs else 0
        if "dvae" in job["run"]:
            from dalle_pipeline.components.dvae.train import run as train_dvae

            dvae_settings = resolve("micro", {"dvae.image_data": job["image_data"], **steps("dvae")}).dvae
            timed("dvae", curated_items, lambda: train_dvae(dvae_settings, work / "curated", work / "dvae-trained",
                                                           image_size, seed=0))
            result["stages"]["dvae"].update(steps=outputs["dvae"].step, image_data=job["image_data"])
        if "text-tokenizer" in job["run"]:
            from dalle_pipeline.components.text.tokenizer import run as train_tokenizer

            timed("text-tokenizer", curated_items, lambda: train_tokenizer(TokenizerConfig(), work / "curated",
                                                                           work / "text"))
        if "tokenize-corpus" in job["run"]:
            from dalle_pipeline.components.tokenize_corpus.run import run as tokenize

            dvae_cfg = model_config(resolve("micro").dvae, image_size)
            torch.manual_seed(0)
            dvae_dir = outputs["dvae"].checkpoint_dir if "dvae" in outputs else \
                checkpoint.save(work / "dvae", "dvae", DiscreteVAE(dvae_cfg).state_dict(), dvae_cfg.to_dict())
            tokenizer_path = outputs["text-tokenizer"].tokenizer_path
            timed("tokenize-corpus", curated_items, lambda: tokenize(
                work / "curated", dvae_dir, tokenizer_path, work / "tokens", TokenizerConfig().text_len,
                batch_size=job["tokenize_batch"]))
            result["stages"]["tokenize-corpus"].update(rows=outputs["tokenize-corpus"].rows,
                                                       dvae=dvae_cfg.to_dict())
        if "prior" in job["run"]:
            from dalle_pipeline.components.prior.train import run as train_prior

            prior_settings = resolve("micro", {**steps("prior"), **({"prior.checkpoint_every": max(1, job["steps"] // 2)}
                                                                     if job.get("steps") else {})}).prior
            timed("prior", curated_items, lambda: train_prior(prior_settings, work / "tokens", work / "prior", seed=0))
            result["stages"]["prior"].update(steps=outputs["prior"].step)
    finally:
        if "ray" in sys.modules:  # ours, or the one tokenize-corpus started under --no-ray
            disconnect()
    return result


def child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = run_stages(job)
    Path(job["result"]).write_text(json.dumps(result, default=str))


# the parent: corpus, children, summary ----------------------------------------------------------


def run_size(size: int, args: argparse.Namespace, stages: list[str], to_run: list[str]) -> dict:
    source, corpus_info = corpus(size, args)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"bench-scale-n{size}-", dir=args.work_dir))
    job = {"size": size, "source": str(source), "work": str(work), "result": str(work / "_result.json"),
           "image_size": args.image_size, "holdout_fraction": args.holdout_fraction,
           "near_duplicate_distance": args.near_duplicate_distance, "tokenize_batch": args.tokenize_batch,
           "image_data": args.image_data, "steps": args.steps,
           "interval": args.interval, "ray": not args.no_ray, "stages": stages, "run": to_run}
    (work / "_job.json").write_text(json.dumps(job))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        # the child's output goes to our stderr: stdout carries the JSON alone
        done = subprocess.run([sys.executable, __file__, "--child", str(work / "_job.json")], stdout=sys.stderr,
                              cwd=Path(__file__).resolve().parent)
        if done.returncode != 0:
            raise RuntimeError(f"scale: the child for N={size} failed (exit {done.returncode}); its output is above")
        result = json.loads((work / "_result.json").read_text())
    finally:
        if args.keep:
            print(f"scale: work dir kept at {work}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["child_seconds"] = time.perf_counter() - started
    result["corpus"] = corpus_info
    result["work_dir"] = str(work) if args.keep else None
    result["load_average_1m"] = {"start": load_before, "end": os.getloadavg()[0]}
    print(json.dumps({"N": size, **{stage: {key: row[key] for key in ("seconds", "items_per_s", "peak_pss_mb")}
                                    for stage, row in result["stages"].items()}}, default=str),
          file=sys.stderr, flush=True)
    return result


def scaling(runs: list[dict], stages: list[str]) -> dict:
    """Largest N against smallest: items/s ratio, peak-PSS difference and its growth per item of the corpus."""
    small, large = runs[0], runs[-1]
    added = large["items"] - small["items"]

    def growth(before: float, after: float) -> dict:
        return {"peak_pss_diff_mb": after - before,
                "pss_growth_bytes_per_item": (after - before) * MB / added if added else None}

    def by_role(before: dict, after: dict) -> dict:  # at each N's peak: which processes grew
        roles = sorted(set(before) | set(after))
        return {role: after.get(role, 0.0) - before.get(role, 0.0) for role in roles}

    out = {"smallest_n": small["items"], "largest_n": large["items"],
           "overall": growth(small["peak"]["peak_pss_mb"], large["peak"]["peak_pss_mb"]), "stages": {}}
    for stage in stages:
        before, after = small["stages"].get(stage), large["stages"].get(stage)
        if before and after:
            out["stages"][stage] = {"items_per_s_ratio": after["items_per_s"] / before["items_per_s"],
                                    **growth(before["peak_pss_mb"], after["peak_pss_mb"]),
                                    "peak_pss_diff_mb_by_role": by_role(before.get("peak_pss_mb_by_role", {}),
                                                                        after.get("peak_pss_mb_by_role", {})),
                                    "peak_pss_file_diff_mb_by_role": by_role(
                                        before.get("peak_pss_file_mb_by_role", {}),
                                        after.get("peak_pss_file_mb_by_role", {}))}
    return out


def extrapolation(run: dict, stages: list[str], cores: int) -> dict:
    per_stage, total = {}, 0.0
    for stage in stages:
        row = run["stages"].get(stage)
        if not row or not row["items"]:
            continue
        core_seconds = row["seconds"] * cores / row["items"]
        hours = TARGET_IMAGES * core_seconds / (TARGET_NODES * cores) / 3600
        per_stage[stage] = {"core_seconds_per_item": core_seconds, "hours": hours}
        total += hours
    return {"images": TARGET_IMAGES, "nodes": TARGET_NODES, "cores_per_node": cores, "from_n": run["items"],
            "stages": per_stage, "total_hours": total, "assumption": EXTRAPOLATION}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 40_000, 160_000], help="corpus sizes N")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (the stages they need run too, unmeasured)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated images and the pipeline's")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per generated shard")
    parser.add_argument("--holdout-fraction", type=float, default=0.01)
    parser.add_argument("--near-duplicate-distance", type=int, default=4, help="the filter's pHash distance")
    parser.add_argument("--tokenize-batch", type=int, default=256, help="tokenize-corpus batch_size")
    parser.add_argument("--image-data", choices=["auto", "memory", "stream"], default="auto",
                        help="dvae: how its images are read (dvae.image_data)")
    parser.add_argument("--steps", type=int, default=None,
                        help="updates of the dvae and prior stages (default: the micro preset's); the prior validates "
                             "and checkpoints halfway and at the end")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--no-ray", action="store_true", help="no Ray session before the stages")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="corpus generation processes")
    parser.add_argument("--cache-dir", default="~/.cache/dalle-pipeline/bench-scale", help="the generated corpora")
    parser.add_argument("--work-dir", help="where each N's temporary work dir goes (default: the system's temp)")
    parser.add_argument("--keep", action="store_true", help="keep each N's work dir")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown or not args.stages:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    if min(args.sizes) < 1:
        parser.error("--sizes must be positive")
    return args


def needed(stages: list[str]) -> list[str]:
    wanted = set(stages)
    for stage in reversed(STAGES):
        if stage in wanted:
            wanted.update(NEEDS[stage])
    return [stage for stage in STAGES if stage in wanted]


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return {}
    args = parse_args(argv)
    import torch  # device_name's argument; nothing runs on it

    stages = [stage for stage in STAGES if stage in args.stages]
    to_run = needed(stages)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runs = [run_size(size, args, stages, to_run) for size in sorted(set(args.sizes))]
    cluster_cpus = runs[-1]["cluster"]["cpus"] if runs[-1].get("cluster") else None
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    result = {
        "bench": "scale",
        "settings": settings,
        "device": device_name(torch.device("cpu")),
        "cores": cores,
        "ray": None if args.no_ray else {"cluster_cpus": cluster_cpus},
        "memory": "PSS (and RSS) summed over the child process of each N and all its descendants (Ray's gcs, "
                  f"raylet, workers), sampled every {args.interval} s; MB = 2^20 bytes",
        "stages_run": to_run,
        "runs": runs,
        "scaling": scaling(runs, stages) if len(runs) > 1 else None,
        "extrapolation": extrapolation(runs[-1], stages, int(cluster_cpus or cores)),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return emit(result, args.out or None)


if __name__ == "__main__":
    main()
