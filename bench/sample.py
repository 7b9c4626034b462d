"""Sampling throughput: the prior's KV-cache sampler against recomputing the whole prefix every step.

Same model, same prompts, same generator seed, in one process; torch alone, so it runs on a lent
GPU machine as is. Defaults are the `tiny` preset's prior:

    python bench/sample.py --layers 4 --d-model 128 --heads 4 --text-len 24 --grid 8 --batch 64

On CUDA it also times the sampler with its decode steps replayed from CUDA graphs, and sets both
against the memory-bandwidth bound of #6: each image step reads the KV cache written so far (on
average text + half the image), so an image costs image_len x 2 x layers x mean prefix x d_model x
bytes, and the bound is bandwidth over that: the device's measured copy bandwidth, and the nominal
one the issue counts with (H200 4.8 TB/s, H100 3.35 TB/s). Row and column layers read only the
text and one segment, so the sampler reads less than the bound counts: `kv_bytes_read_per_image`
is what it does read, and `achieved_bandwidth_share` that over the time, against the measured
bandwidth. The paper-size GPU run of #6:

    python bench/sample.py --layers 24 --d-model 1024 --heads 16 --text-len 256 --grid 32 \\
        --text-vocab 16384 --image-vocab 8192 --batch 128 --skip-recompute

Prints one JSON object with images/s for each and the speed-ups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import device_name, emit, prior_config, prior_parser, timed

from dalle_pipeline.components.prior.model import Prior, layer_attention_types
from dalle_pipeline.components.sample.generate import filter_logits, kv_buckets, sample_image_tokens

NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, HBM3e / HBM3 (SXM)


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


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s moved (read + written) by a large device-to-device copy: the bound's denominator."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * repeats / seconds


def kv_entries_read_per_image(prior: Prior, segments: bool) -> float:
    """Cache entries (keys and values, all layers) the sampler reads for one image: with `segments`,
    row and column layers the text and one segment per step; the others the bucket covering each
    position."""
    cfg = prior.cfg
    text_positions = cfg.text_len + 1
    buckets = kv_buckets(cfg.text_len, cfg.image_len)
    positions = range(text_positions, text_positions + cfg.image_len - 1)
    mean_bucket = sum(next(b for b in buckets if b > p) for p in positions) / len(positions)
    per_step = sum(text_positions + cfg.grid_size if segments and kind in ("row", "column") else mean_bucket
                   for kind in layer_attention_types(cfg))
    return cfg.image_len * 2 * per_step


def main(argv: list[str] | None = None) -> dict:
    parser = prior_parser(__doc__.splitlines()[0], layers=4, d_model=128, heads=4, text_len=24, grid=8,
                          text_vocab=512, image_vocab=256, batch=64, top_k=32)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="weights and KV cache (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--skip-recompute", action="store_true", help="leave out the (slow) recompute baseline")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    cfg = prior_config(args)
    prior = Prior(cfg).to(device=device, dtype=dtype).eval()
    text = torch.randint(0, args.text_vocab, (args.batch, args.text_len), device=device)
    lengths = torch.randint(1, args.text_len + 1, (args.batch,), device=device)

    def sampler(cuda_graph: bool):
        def run() -> None:
            sample_image_tokens(prior, text, lengths, torch.Generator(device).manual_seed(0), top_k=args.top_k,
                                cuda_graph=cuda_graph)
        return run

    result: dict = {"bench": "sample", "settings": {**vars(args), "dtype": str(dtype)},
                    "threads": torch.get_num_threads(),
                    "baseline": "full forward over the whole prefix at every token, same model and generator"}
    result["kv_cache_images_per_s"] = args.batch / timed(sampler(False), device)
    if not args.skip_recompute:
        recomputed_s = timed(lambda: sample_by_recomputing(prior, text, lengths, torch.Generator(device).manual_seed(0),
                                                           args.top_k), device)
        result["recompute_images_per_s"] = args.batch / recomputed_s
        result["speedup"] = result["kv_cache_images_per_s"] / result["recompute_images_per_s"]
    result["device"] = device_name(device)
    if device.type == "cuda":
        result["kv_cache_cuda_graph_images_per_s"] = args.batch / timed(sampler(True), device)
        mean_prefix = cfg.text_len + 1 + cfg.image_len / 2
        bytes_per_image = cfg.image_len * 2 * cfg.layers * mean_prefix * cfg.d_model * dtype.itemsize
        segments = prior.decodes_by_segments(torch.empty(0, device=device, dtype=dtype))  # a cache's device, dtype
        bytes_read = kv_entries_read_per_image(prior, segments) * cfg.d_model * dtype.itemsize
        bandwidth = copy_bandwidth(device)
        bound = bandwidth / bytes_per_image
        best = max(result["kv_cache_images_per_s"], result["kv_cache_cuda_graph_images_per_s"])
        result.update({
            "kv_bytes_per_image": bytes_per_image, "copy_bandwidth_bytes_per_s": bandwidth,
            "bandwidth_bound_images_per_s": bound,
            "share_of_bound_eager": result["kv_cache_images_per_s"] / bound,
            "share_of_bound_cuda_graph": result["kv_cache_cuda_graph_images_per_s"] / bound,
            "kv_bytes_read_per_image": bytes_read,
            "achieved_bandwidth_share": best * bytes_read / bandwidth,
        })
        nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in result["device"]), None)
        if nominal:
            result["nominal_bound_images_per_s"] = nominal / bytes_per_image
            result["share_of_nominal_bound"] = best / result["nominal_bound_images_per_s"]
    return emit(result)


if __name__ == "__main__":
    main()
