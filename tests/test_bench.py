"""The benchmarks' own checks, where they can go wrong before they measure anything."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_tokenizer_benchmark_refuses_a_kind_the_preset_does_not_allow_before_it_trains():
    """`small` keeps a weight average (gumbel); the vq kind cannot take one. The benchmark used to
    swap the kind in unvalidated and train vq with the average (the bug behind #15's 0.26 codes used)."""
    done = subprocess.run([sys.executable, str(BENCH / "image_tokenizers.py"), "--preset", "small", "--kinds", "vq",
                           "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "dvae.optim.ema_decay 0.99 with dvae.quantizer vq" in done.stderr
    assert "seed 0:" not in done.stdout  # nothing trained


def test_no_benchmark_shadows_a_package_its_imports_need():
    """A script's folder is first on sys.path: bench/tokenizers.py hid HF `tokenizers` from every benchmark
    that imported the text tokenizer (bench/dvae.py --corpus-tokenization failed on import)."""
    import importlib.util

    assert [path.name for path in BENCH.glob("*.py") if importlib.util.find_spec(path.stem) is not None] == []


def test_the_memory_plan_counts_states_by_shard_and_activations_by_rows(tmp_path):
    """bench/memory.py on the meta device: FSDP divides the 16 bytes a parameter of states by the GPU count,
    DDP does not, and the activations measured grow with the micro-batch (weights are not counted as them)."""
    import json

    plans = []
    for rows in (1, 2):
        done = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--preset", "small", "--gpus", "1", "4",
                               "--micro-batch", str(rows), "--out", str(tmp_path / f"{rows}.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        plans.append(json.loads((tmp_path / f"{rows}.json").read_text()))
    one, two = plans
    params = one["parameters"]
    fsdp = {row["gpus"]: row for row in one["training_per_gpu"]["fsdp"]}
    assert abs(fsdp[4]["adam_moments_fp32"] * 2**30 - 8 * params / 4) < 1e3
    assert abs(fsdp[1]["weights_fp32"] / fsdp[4]["weights_fp32"] - 4) < 1e-9
    assert one["training_per_gpu"]["ddp"][1]["weights_fp32"] == fsdp[1]["weights_fp32"]
    activations = one["activations_gib_per_micro_batch"]["whole"], two["activations_gib_per_micro_batch"]["whole"]
    assert abs(activations[1] / activations[0] - 2) < 0.01 and activations[0] * 2**30 < 2 * params
