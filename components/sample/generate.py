"""Autoregressive image-token sampling with the prior's KV cache, and CLIP reranking.

The sampler is apart from the model (diffusers' split): it takes a trained `Prior`, a
`torch.Generator` for reproducibility, and returns tokens with each candidate's log-likelihood.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F

from ..prior.model import Prior

KV_BUCKETS = 8


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then keep the k most likely tokens, then the smallest set holding top_p of the mass."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        drop_sorted = mass_before >= top_p  # the most likely token always survives (mass before it is 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def kv_buckets(text_len: int, image_len: int, count: int = KV_BUCKETS) -> list[int]:
    """Cache lengths the decode steps attend over: `count` steps from just past the text to the end."""
    first = text_len + 1
    return sorted({first + math.ceil(image_len * i / count) for i in range(1, count + 1)})


class ImageDecoder:
    """`prior.decode_step` at a given position, eager or replayed from captured CUDA graphs.

    The token and the position live in static device tensors. A step at position p attends over
    the smallest bucket of cache entries that covers p (`kv_buckets`), so the cache read per step
    is little more than the prefix written so far. With `cuda_graph`, each bucket's step (every
    layer, the cache writes, the logits) is captured once and replayed at each of its positions:
    a decode step costs one launch instead of hundreds.
    """

    def __init__(self, prior: Prior, cache, rows: int, device: torch.device, cuda_graph: bool) -> None:
        self.prior, self.cache = prior, cache
        self.buckets = kv_buckets(prior.cfg.text_len, prior.cfg.image_len)
        self.token = torch.zeros(rows, dtype=torch.long, device=device)
        # the first image slot: what warm-up and capture write there, the first real step overwrites
        self.position = torch.full((), prior.cfg.text_len + 1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if cuda_graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture (allocations, lazy mask copies)
                for kv_len in self.buckets:
                    prior.decode_step(self.token, self.position, cache, kv_len)
            torch.cuda.current_stream(device).wait_stream(side)
            for kv_len in self.buckets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = prior.decode_step(self.token, self.position, cache, kv_len)
                self.graphs[kv_len] = (graph, logits)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        kv_len = self.buckets[bisect.bisect_right(self.buckets, position)]  # the first bucket past position
        self.token.copy_(token)
        self.position.fill_(position)
        if not self.graphs:
            return self.prior.decode_step(self.token, self.position, self.cache, kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        return logits


@torch.no_grad()
def sample_image_tokens(
    prior: Prior,
    text_tokens: torch.Tensor,
    lengths: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    image_prefix: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """text_tokens (B, text_len) unpadded ids + lengths (B,) -> (image tokens (B, N), log-likelihood (B,)).

    guidance_scale != 1 runs the null caption (all padding, what caption dropout trained) beside
    each prompt and samples from uncond + scale * (cond - uncond). `image_prefix` (B, P) fixes the
    first P tokens (the paper's image-to-image: the top rows of a given image). The log-likelihood
    is the conditional model's own (temperature 1, no filtering) log-probability of the sampled tokens.
    `cuda_graph` (None: on CUDA) replays each decode step from one captured CUDA graph.
    """
    cfg = prior.cfg
    batch, device = len(text_tokens), text_tokens.device
    guided = guidance_scale != 1.0
    if guided:
        text_tokens = torch.cat([text_tokens, torch.zeros_like(text_tokens)])
        lengths = torch.cat([lengths, torch.zeros_like(lengths)])
    text = prior.input_text(prior.pad_text(text_tokens, lengths))
    rows = len(text)
    cache = prior.new_cache(rows, device, dtype=next(prior.parameters()).dtype)
    no_image = text.new_zeros(rows, 0)
    logits = prior.step(text, no_image, cache, start=0)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    decode = ImageDecoder(prior, cache, rows, device, cuda_graph)
    prefix_len = 0 if image_prefix is None else image_prefix.shape[1]
    tokens = torch.zeros(batch, cfg.image_len, dtype=torch.long, device=device)
    log_likelihood = torch.zeros(batch, device=device)
    for index in range(cfg.image_len):
        conditional = logits[:batch].float()
        if index < prefix_len:
            token = image_prefix[:, index].to(device)
        else:
            mixed = conditional
            if guided:
                unconditional = logits[batch:].float()
                mixed = unconditional + guidance_scale * (conditional - unconditional)
            probs = F.softmax(filter_logits(mixed, temperature, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            log_likelihood += F.log_softmax(conditional, dim=-1).gather(1, token[:, None]).squeeze(1)
        tokens[:, index] = token
        if index < cfg.image_len - 1:
            feed = torch.cat([token, token]) if guided else token
            logits = decode(feed, cfg.text_len + 1 + index)
    return tokens, log_likelihood


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores (prompts, candidates) -> indices (prompts, keep) of the best candidates, best first."""
    if keep > scores.shape[1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[1]} candidates")
    return scores.argsort(dim=1, descending=True)[:, :keep]
