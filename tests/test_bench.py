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
