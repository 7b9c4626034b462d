"""Autoregressive image-token sampling with the prior's KV cache, and CLIP reranking.

The sampler is apart from the model (diffusers' split): it takes a trained `Prior`, a
`torch.Generator` for reproducibility, and returns tokens with each candidate's log-likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..prior.model import Prior


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


@torch.no_grad()
def sample_image_tokens(
    prior: Prior,
    text_tokens: torch.Tensor,
    lengths: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """text_tokens (B, text_len) unpadded ids + lengths (B,) -> (image tokens (B, N), log-likelihood (B,)).

    The log-likelihood is the model's own (temperature 1, no top-k) log-probability of the drawn tokens.
    """
    cfg = prior.cfg
    batch, device = len(text_tokens), text_tokens.device
    text = prior.input_text(prior.pad_text(text_tokens, lengths))
    cache = prior.new_cache(batch, device)
    no_image = text.new_zeros(batch, 0)
    no_text = text.new_zeros(batch, 0)
    logits = prior.step(text, no_image, cache, start=0)
    tokens = torch.zeros(batch, cfg.image_len, dtype=torch.long, device=device)
    log_likelihood = torch.zeros(batch, device=device)
    for index in range(cfg.image_len):
        probs = F.softmax(filter_logits(logits.float(), temperature, top_k), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens[:, index] = token
        log_likelihood += F.log_softmax(logits.float(), dim=-1).gather(1, token[:, None]).squeeze(1)
        if index < cfg.image_len - 1:
            logits = prior.step(no_text, token[:, None], cache, start=cfg.text_len + 1 + index)
    return tokens, log_likelihood


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores (prompts, candidates) -> indices (prompts, keep) of the best candidates, best first."""
    if keep > scores.shape[1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[1]} candidates")
    return scores.argsort(dim=1, descending=True)[:, :keep]
