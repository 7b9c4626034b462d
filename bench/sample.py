"""Sampling throughput: the prior's KV-cache sampler against recomputing the whole prefix every step.

Same model, same prompts, same generator seed, in one process; torch alone, so it runs on a lent
GPU machine as is. Defaults are the `tiny` preset's prior:

    python bench/sample.py --layers 4 --d-model 128 --heads 4 --text-len 24 --grid 8 --batch 64

Prints one JSON object with images/s for both and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_pipeline.components.prior.model import Prior, PriorModelConfig  # noqa: E402
from dalle_pipeline.components.sample.generate import filter_logits, sample_image_tokens  # noqa: E402


@torch.no_grad()
def sample_by_recomputing(prior: Prior, text, lengths, generator, top_k: int) -> torch.Tensor:
    """The baseline: a full forward pass over everything so far for every new token (no cache)."""
    cfg = prior.cfg
    padded = prior.pad_text(text, lengths)
    tokens = torch.zeros(len(text), cfg.image_len, dtype=torch.long, device=text.device)
    for index in range(cfg.image_len):
        _, image_logits = prior(padded, tokens)  # causal: position index sees only tokens < index
        probs = F.softmax(filter_logits(image_logits[:, index].float(), 1.0, top_k), dim=-1)
        tokens[:, index] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("--layers", 4), ("--d-model", 128), ("--heads", 4), ("--text-len", 24), ("--grid", 8),
                          ("--text-vocab", 512), ("--image-vocab", 256), ("--batch", 64), ("--top-k", 32)]:
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--attention", choices=["dalle", "dense"], default="dalle")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = PriorModelConfig(text_vocab=args.text_vocab, image_vocab=args.image_vocab, text_len=args.text_len,
                           grid_size=args.grid, layers=args.layers, d_model=args.d_model, heads=args.heads,
                           attention=args.attention)
    prior = Prior(cfg).to(device).eval()
    text = torch.randint(0, args.text_vocab, (args.batch, args.text_len), device=device)
    lengths = torch.randint(1, args.text_len + 1, (args.batch,), device=device)

    def cached() -> None:
        sample_image_tokens(prior, text, lengths, torch.Generator(device).manual_seed(0), top_k=args.top_k)

    def recomputed() -> None:
        sample_by_recomputing(prior, text, lengths, torch.Generator(device).manual_seed(0), args.top_k)

    cached()  # warm-up
    cached_s, recomputed_s = timed(cached), timed(recomputed)
    result = {
        "bench": "sample",
        "settings": vars(args),
        "threads": torch.get_num_threads(),
        "kv_cache_images_per_s": args.batch / cached_s,
        "recompute_images_per_s": args.batch / recomputed_s,
        "baseline": "full forward over the whole prefix at every token, same model and generator",
    }
    result["speedup"] = result["kv_cache_images_per_s"] / result["recompute_images_per_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
