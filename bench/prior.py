"""Prior training throughput: our Prior (the paper's masks) against a plain eager GPT of the same dims.

Runs with torch alone (no Prefect, Ray or MLflow), so it runs on a lent GPU machine as is:

    python bench/prior.py --layers 6 --d-model 192 --heads 6 --text-len 24 --grid 8 \
        --text-vocab 1000 --image-vocab 256 --batch 64 --steps 5

Prints one JSON object: tokens/s of each, the ratio, each one's MFU (6N + 12·L·T·d FLOPs per token
against this device's measured matmul peak in the precision used) and the settings. The baseline
is measured in the same process, so the ratio compares like with like. `--peer SITE` also runs the
peer (lucidrains' DALLE-pytorch 1.6.6, `../shared/anchors/peer_prior.py`; SITE is what
`../shared/anchors/peer_setup.sh PYTHON` prints) at the same dims and steps, right after ours, and
reports `ours_over_peer`. `--precision auto` is the training loop's choice: bf16 where this device
has native bf16 matmuls, fp32 elsewhere. The GPU run of #5, with the paper's masks and then
all-dense-causal for the masks' cost:

    python bench/prior.py --layers 24 --d-model 1024 --heads 16 --text-len 256 --grid 32 \
        --text-vocab 16384 --image-vocab 8192 --batch 16 --steps 10 --precision bf16 --compile
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import device_name, emit, prior_config, prior_parser, timed
from torch import nn

from dalle_pipeline.components.prior.model import Prior, prior_loss
from dalle_pipeline.components.training.flops import measured_matmul_peak, transformer_flops_per_token
from dalle_pipeline.components.training.loop import bf16_supported

PEER_SCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "peer_prior.py"


class PlainGPT(nn.Module):
    """The baseline: pre-LN transformer, dense causal SDPA, one vocabulary, nothing else."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm1": nn.LayerNorm(d_model), "qkv": nn.Linear(d_model, 3 * d_model),
                "proj": nn.Linear(d_model, d_model), "norm2": nn.LayerNorm(d_model),
                "mlp": nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)),
            }) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["proj"](attn.transpose(1, 2).reshape(batch, length, -1))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x))


def peer_tokens_per_s(site: str, args, script: Path = PEER_SCRIPT) -> dict:
    """The peer's training throughput at our dims, from its anchor script in a process of its own."""
    if not script.is_file():
        raise SystemExit(f"--peer: the peer's benchmark {script} is not there (it lives in the shared anchors)")
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
             ("layers", "d_model", "heads", "text_len", "grid", "image_vocab", "text_vocab", "batch", "steps")]
    done = subprocess.run([sys.executable, str(script), site, *flags, f"--device={args.device}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"--peer: {script.name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = prior_parser(__doc__.splitlines()[0], layers=6, d_model=192, heads=6, text_len=24, grid=8,
                          text_vocab=1000, image_vocab=256, batch=64, steps=5)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="autocast for ours; auto: bf16 where the device has native bf16 matmuls")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours")
    parser.add_argument("--peer", metavar="SITE", help="also run the peer (DALLE-pytorch) installed in SITE")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = "bf16" if bf16_supported(device.type) else "fp32"
    torch.manual_seed(0)

    cfg = prior_config(args)
    tokens_per_step = args.batch * cfg.seq_len
    text = torch.randint(0, args.text_vocab, (args.batch, args.text_len), device=device)
    image = torch.randint(0, args.image_vocab, (args.batch, cfg.image_len), device=device)

    ours = Prior(cfg).to(device)
    fused = device.type == "cuda" or None
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused)
    ours_forward = torch.compile(ours) if args.compile else ours
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def ours_step() -> None:
        with autocast:
            loss, _ = prior_loss(*ours_forward(text, image), text, image, 1 / 8)
        ours_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ours_optimizer.step()

    vocab = args.text_vocab + args.image_vocab
    baseline = PlainGPT(vocab, cfg.seq_len, args.d_model, args.heads, args.layers).to(device)
    baseline_optimizer = torch.optim.AdamW(baseline.parameters(), lr=1e-4, fused=fused)
    sequence = torch.cat([text, image + args.text_vocab], dim=1)

    def baseline_step() -> None:
        logits = baseline(sequence[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), sequence[:, 1:].flatten())
        baseline_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        baseline_optimizer.step()

    baseline_s = timed(baseline_step, device, args.steps)
    ours_s = timed(ours_step, device, args.steps)
    result = {
        "bench": "prior_train",
        "settings": vars(args),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "ours_tokens_per_s": tokens_per_step * args.steps / ours_s,
        "baseline_tokens_per_s": tokens_per_step * args.steps / baseline_s,
        "baseline": "plain eager GPT, dense causal SDPA, same dims, AdamW",
    }
    result["ours_over_baseline"] = result["ours_tokens_per_s"] / result["baseline_tokens_per_s"]
    if args.peer:
        peer = peer_tokens_per_s(args.peer, args)
        result.update({"peer": peer["system"], "peer_tokens_per_s": peer["tokens_per_s"],
                       "ours_over_peer": result["ours_tokens_per_s"] / peer["tokens_per_s"]})
    ours_peak = measured_matmul_peak(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    fp32_peak = measured_matmul_peak(device, torch.float32)
    ours_flops = transformer_flops_per_token(ours, args.layers, cfg.seq_len, args.d_model)
    baseline_flops = transformer_flops_per_token(baseline, args.layers, cfg.seq_len, args.d_model)
    result.update({
        "flops_per_token": ours_flops, "matmul_peak_flops": ours_peak,
        "ours_mfu": result["ours_tokens_per_s"] * ours_flops / ours_peak,
        "baseline_mfu": result["baseline_tokens_per_s"] * baseline_flops / fp32_peak,
    })
    return emit(result)


if __name__ == "__main__":
    main()
