import pytest
import torch

from dalle_pipeline.components.prior.model import (
    Prior,
    PriorModelConfig,
    build_mask,
    layer_attention_types,
    prior_loss,
)
from dalle_pipeline.components.sample.generate import sample_image_tokens

CFG = PriorModelConfig(text_vocab=50, image_vocab=16, text_len=4, grid_size=3, layers=4, d_model=32, heads=2,
                       conv_kernel=3)


def reference_allowed(cfg: PriorModelConfig, kind: str) -> set[tuple[int, int]]:
    """Allowed (query, key) input indices, written out position by position."""
    text_positions = cfg.text_len + 1
    allowed = set()
    for q in range(cfg.seq_len):
        for k in range(q + 1):
            if q < text_positions or k < text_positions or kind == "dense":
                allowed.add((q, k))
                continue
            qr, qc = divmod(q - text_positions, cfg.grid_size)
            kr, kc = divmod(k - text_positions, cfg.grid_size)
            if (kind == "row" and qr == kr) or (kind == "column" and qc == kc) or (
                kind == "conv" and abs(qr - kr) <= cfg.conv_kernel // 2 and abs(qc - kc) <= cfg.conv_kernel // 2
            ):
                allowed.add((q, k))
    return allowed


@pytest.mark.parametrize("kind", ["dense", "row", "column", "conv"])
def test_masks_match_the_reference_pairs(kind):
    mask = build_mask(CFG, kind)
    assert {tuple(pair) for pair in mask.nonzero().tolist()} == reference_allowed(CFG, kind)


def test_layer_schedule_follows_the_paper():
    cfg = PriorModelConfig(layers=8)
    assert layer_attention_types(cfg) == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    assert set(layer_attention_types(PriorModelConfig(layers=8, attention="dense"))) == {"dense"}


def test_changing_a_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    text = torch.randint(0, CFG.text_vocab, (1, CFG.text_len))
    image = torch.randint(0, CFG.image_vocab, (1, CFG.image_len))
    text_logits, image_logits = model(text, image)
    before = torch.cat([text_logits[..., :16], image_logits], dim=1)
    target = torch.cat([text, image], dim=1)
    for t in range(1, CFG.seq_len - 1):
        changed = target.clone()
        changed[0, t] = (changed[0, t] + 1) % 16
        new_text, new_image = model(changed[:, : CFG.text_len], changed[:, CFG.text_len :])
        after = torch.cat([new_text[..., :16], new_image], dim=1)
        # the output at index p predicts target p from targets < p: positions <= t are unaffected
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_kv_cache_decoding_gives_the_full_forward_logits():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    text = torch.randint(0, CFG.text_vocab, (2, CFG.text_len))
    lengths = torch.tensor([2, 4])
    tokens, _ = sample_image_tokens(model, text, lengths, torch.Generator().manual_seed(0))
    _, full_logits = model(model.pad_text(text, lengths), tokens)
    cache = model.new_cache(2, torch.device("cpu"))
    step_logits = [model.step(model.input_text(model.pad_text(text, lengths)), text[:, :0], cache, 0)]
    for index in range(CFG.image_len - 1):
        step_logits.append(model.step(text[:, :0], tokens[:, index : index + 1], cache, CFG.text_len + 1 + index))
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full_logits, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    text, lengths = torch.randint(0, 50, (3, CFG.text_len)), torch.tensor([1, 2, 3])
    first, ll_first = sample_image_tokens(model, text, lengths, torch.Generator().manual_seed(7), top_k=4)
    second, ll_second = sample_image_tokens(model, text, lengths, torch.Generator().manual_seed(7), top_k=4)
    assert torch.equal(first, second) and torch.equal(ll_first, ll_second)
    assert (ll_first < 0).all()


def test_padding_uses_one_learned_token_per_position():
    model = Prior(CFG)
    padded = model.pad_text(torch.tensor([[5, 6, 7, 8]]), torch.tensor([2]))
    assert padded.tolist() == [[5, 6, CFG.pad_id(2), CFG.pad_id(3)]]


def test_loss_falls_on_a_learnable_mapping():
    from dalle_pipeline.components.config import OptimConfig
    from dalle_pipeline.components.training import TensorBatches, fit

    torch.manual_seed(0)
    text = torch.randint(0, 8, (256, CFG.text_len))
    image = (text[:, :1] * 2 + torch.arange(CFG.image_len)) % CFG.image_vocab  # image determined by text
    lengths = torch.full((256,), CFG.text_len)
    model = Prior(CFG)

    def loss_fn(m, batch, step):
        t, _, i = batch
        return prior_loss(*m(t, i), t, i, 1 / 8)

    result = fit(model, loss_fn, iter(TensorBatches((text, lengths, image), 32, 0)),
                 OptimConfig(steps=120, lr=3e-3, warmup_steps=10, log_every=20))
    image_losses = [row["image_loss"] for row in result.history]
    assert image_losses[-1] < 0.5 * image_losses[0]
