"""Autoregressive image-token sampling with the prior's KV cache, and CLIP reranking.

The sampler is apart from the model (diffusers' split): it takes a trained `Prior`, a
`torch.Generator` for reproducibility, and returns tokens with each candidate's log-likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..prior.model import Prior


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """text_tokens (B, text_len) unpadded ids + lengths (B,) -> (image tokens (B, N), log-likelihood (B,)).

    guidance_scale != 1 runs the null caption (all padding, what caption dropout trained) beside
    each prompt and samples from uncond + scale * (cond - uncond). `image_prefix` (B, P) fixes the
    first P tokens (the paper's image-to-image: the top rows of a given image). The log-likelihood
    is the conditional model's own (temperature 1, no filtering) log-probability of the sampled tokens.
    """
    cfg = prior.cfg
    batch, device = len(text_tokens), text_tokens.device
    guided = guidance_scale != 1.0
    if guided:
        text_tokens = torch.cat([text_tokens, torch.zeros_like(text_tokens)])
        lengths = torch.cat([lengths, torch.zeros_like(lengths)])
    text = prior.input_text(prior.pad_text(text_tokens, lengths))
    rows = len(text)
    cache = prior.new_cache(rows, device)
    no_image, no_text = text.new_zeros(rows, 0), text.new_zeros(rows, 0)
    logits = prior.step(text, no_image, cache, start=0)
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
            logits = prior.step(no_text, feed[:, None], cache, start=cfg.text_len + 1 + index)
    return tokens, log_likelihood


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores (prompts, candidates) -> indices (prompts, keep) of the best candidates, best first."""
    if keep > scores.shape[1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[1]} candidates")
    return scores.argsort(dim=1, descending=True)[:, :keep]
