"""Sampling throughput: the prior's KV-cache sampler against recomputing the whole prefix every step.

Same model, same prompts, same generator seed, in one process; torch alone, so it runs on a lent
GPU machine as is. Defaults are the `tiny` preset's prior:

    python bench/sample.py --layers 4 --d-model 128 --heads 4 --text-len 24 --grid 8 --batch 64

Prints one JSON object with images/s for both and the speed-up.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from common import prior_config, prior_parser, timed

from dalle_pipeline.components.prior.model import Prior
from dalle_pipeline.components.sample.generate import filter_logits, sample_image_tokens


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


def main(argv: list[str] | None = None) -> dict:
    parser = prior_parser(__doc__.splitlines()[0], layers=4, d_model=128, heads=4, text_len=24, grid=8,
                          text_vocab=512, image_vocab=256, batch=64, top_k=32)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = prior_config(args)
    prior = Prior(cfg).to(device).eval()
    text = torch.randint(0, args.text_vocab, (args.batch, args.text_len), device=device)
    lengths = torch.randint(1, args.text_len + 1, (args.batch,), device=device)

    def cached() -> None:
        sample_image_tokens(prior, text, lengths, torch.Generator(device).manual_seed(0), top_k=args.top_k)

    def recomputed() -> None:
        sample_by_recomputing(prior, text, lengths, torch.Generator(device).manual_seed(0), args.top_k)

    cached_s, recomputed_s = timed(cached, device), timed(recomputed, device)
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
