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


def _decode_logits(model: Prior, step, text, lengths, tokens) -> torch.Tensor:
    """Logits at every image position from prefill + `step(token, position, cache)` calls."""
    cache = model.new_cache(len(text), text.device, next(model.parameters()).dtype)
    logits = [model.step(model.input_text(model.pad_text(text, lengths)), text[:, :0], cache, 0)]
    for index in range(CFG.image_len - 1):
        position = torch.tensor(CFG.text_len + 1 + index, device=text.device)
        logits.append(step(tokens[:, index], position, cache))
    return torch.stack(logits, dim=1)


def _decoding_case(lengths: list[int], backend: str = "auto"):
    """A fresh prior, random captions of these lengths and image tokens, and the full forward's logits."""
    torch.manual_seed(0)
    model = Prior(CFG.model_copy(update={"attention_backend": backend})).eval()
    text = torch.randint(0, CFG.text_vocab, (len(lengths), CFG.text_len))
    tokens = torch.randint(0, CFG.image_vocab, (len(lengths), CFG.image_len))
    with torch.no_grad():
        _, full_logits = model(model.pad_text(text, torch.tensor(lengths)), tokens)
    return model, text, torch.tensor(lengths), tokens, full_logits


@pytest.mark.parametrize("backend", ["auto", "segments"])
def test_the_static_decode_step_gives_the_full_forward_logits(backend):
    """On CPU 'auto' decodes every layer over the cache's buckets, 'segments' reads the text and one
    segment in the row and column layers."""
    model, text, lengths, tokens, full_logits = _decoding_case([2, 4], backend)
    with torch.no_grad():
        torch.testing.assert_close(_decode_logits(model, model.decode_step, text, lengths, tokens), full_logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bf16_decoding_reads_text_and_segments_and_gives_the_full_forward_logits(device):
    """In bf16 the row and column layers decode from the text and one segment of the cache (flash
    kernels exist for bf16 on CPU and CUDA); the logits are the full forward's, within bf16. The
    attention is sharpened (the qkv projection x8), so that reading a wrong segment shows: the
    columns' segment in the row layers and back gave 0.13, this path 0.0024 on CPU."""
    model, text, lengths, tokens, _ = _decoding_case([2, 4], "segments")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    model, text, lengths, tokens = model.to(device, torch.bfloat16), text.to(device), lengths.to(device), tokens.to(device)
    with torch.no_grad():
        _, full_logits = model(model.pad_text(text, lengths), tokens)
        decoded = _decode_logits(model, model.decode_step, text, lengths, tokens)
    assert decoded.dtype == torch.bfloat16
    torch.testing.assert_close(decoded.float(), full_logits.float(), rtol=0, atol=0.02)


def test_the_bucketed_decoder_reads_only_what_covers_the_prefix_and_gives_the_same_logits():
    from dalle_pipeline.components.sample.generate import ImageDecoder, kv_buckets

    assert kv_buckets(4, 9) == [7, 8, 9, 10, 11, 12, 13, 14]  # text 4 + BOS, then one bucket per 9/8 tokens
    assert kv_buckets(256, 1024)[-1] == 256 + 1 + 1024
    model, text, lengths, tokens, full_logits = _decoding_case([4, 1])
    with torch.no_grad():
        decoders = {}

        def step(token, position, cache):
            decoder = decoders.setdefault(id(cache), ImageDecoder(model, cache, 2, text.device, cuda_graph=False))
            return decoder(token, int(position))

        torch.testing.assert_close(_decode_logits(model, step, text, lengths, tokens), full_logits,
                                   rtol=1e-4, atol=1e-4)


def test_the_decode_step_is_one_graph_for_every_position():
    """What CUDA-graph capture needs: no graph break, and no recompilation as the position moves."""
    model, text, lengths, tokens, full_logits = _decoding_case([3, 1], "segments")
    torch._dynamo.reset()
    compiled = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = _decode_logits(model, compiled, text, lengths, tokens)
    torch.testing.assert_close(got, full_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_sampling_draws_the_eager_tokens(dtype):
    torch.manual_seed(0)
    model = Prior(CFG).to("cuda", dtype).eval()
    text, lengths = torch.randint(0, 50, (3, CFG.text_len), device="cuda"), torch.tensor([1, 2, 3], device="cuda")
    eager = sample_image_tokens(model, text, lengths, torch.Generator("cuda").manual_seed(3), top_k=4, cuda_graph=False)
    graphed = sample_image_tokens(model, text, lengths, torch.Generator("cuda").manual_seed(3), top_k=4, cuda_graph=True)
    assert torch.equal(eager[0], graphed[0])
    torch.testing.assert_close(eager[1], graphed[1])


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


@pytest.mark.parametrize("backend", ["segments", "flex", "math"])
def test_attention_paths_agree_with_sdpa(backend):
    """Text-plus-segments and FlexAttention block masks (the CUDA paths) and plain math attention
    (the CPU path) compute what SDPA with the boolean masks does."""
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"layers": 4})
    sdpa = Prior(cfg.model_copy(update={"attention_backend": "sdpa"})).eval()
    flex = Prior(cfg.model_copy(update={"attention_backend": backend})).eval()
    flex.load_state_dict(sdpa.state_dict())
    text = torch.randint(0, cfg.text_vocab, (2, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (2, cfg.image_len))
    with torch.no_grad():
        for a, b in zip(sdpa(text, image), flex(text, image)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_matches_one_big_batch():
    from dalle_pipeline.components.config import OptimConfig
    from dalle_pipeline.components.training import fit

    torch.manual_seed(0)
    text = torch.randint(0, CFG.text_vocab, (8, CFG.text_len))
    image = torch.randint(0, CFG.image_vocab, (8, CFG.image_len))

    def loss_fn(m, batch, step):
        t, i = batch
        return prior_loss(*m(t, i), t, i, 1 / 8)

    start = Prior(CFG).state_dict()
    results = []
    for accumulate, batches in ((1, [(text, image)]), (2, [(text[:4], image[:4]), (text[4:], image[4:])])):
        model = Prior(CFG)
        model.load_state_dict(start)
        fit(model, loss_fn, iter(batches), OptimConfig(steps=1, lr=1e-2, warmup_steps=0, grad_accum_steps=accumulate))
        results.append(model.state_dict())
    # Adam's first step moves each weight by lr * g / (|g| + 1e-8): where a gradient is near 1e-8 (one
    # is, 3e-9) the two sums' rounding shows (1.4e-5 at lr 1e-2); a wrong accumulation moves weights by ~lr
    for name in start:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_keeps_only_each_blocks_input_and_gives_the_same_gradients():
    """With `activation_checkpointing` a block saves nothing for the backward pass but its input (it runs
    again there): far fewer bytes held between forward and backward, the same gradients."""
    torch.manual_seed(0)
    text = torch.randint(0, CFG.text_vocab, (8, CFG.text_len))
    image = torch.randint(0, CFG.image_vocab, (8, CFG.image_len))
    model = Prior(CFG)
    held, gradients = {}, {}
    for checkpointed in (False, True):
        for block in model.blocks:
            block.activation_checkpointing = checkpointed
        model.zero_grad()
        saved = []

        def keep(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss, _ = prior_loss(*model(text, image), text, image, 1 / 8)
        held[checkpointed] = sum(saved)
        loss.backward()
        gradients[checkpointed] = {name: param.grad.clone() for name, param in model.named_parameters()}
    assert held[True] < held[False] / 3, held
    for name, grad in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], grad, rtol=1e-5, atol=1e-7)


def test_a_prior_saved_whole_and_one_streamed_a_tensor_at_a_time_load_the_same(tmp_path):
    """Every registered prior was saved whole (`checkpoint.save`); a prior trained under FSDP is streamed
    into its file a tensor at a time (`checkpoint.save_streamed`). `load` reads both alike, on the device
    asked for, as the model that was saved."""
    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.prior.model import KIND, load

    torch.manual_seed(0)
    model = Prior(CFG).eval()
    state = model.state_dict()
    whole = checkpoint.save(tmp_path / "whole", KIND, state, CFG.to_dict())
    layout = {name: (value.dtype, tuple(value.shape)) for name, value in sorted(state.items())}
    streamed = checkpoint.save_streamed(tmp_path / "streamed", KIND, layout,
                                        ((name, state[name]) for name in layout), CFG.to_dict())
    text = torch.randint(0, CFG.text_vocab, (2, CFG.text_len))
    image = torch.randint(0, CFG.image_vocab, (2, CFG.image_len))
    with torch.no_grad():
        expected = model(text, image)
        for directory in (whole, streamed):
            loaded = load(directory, device="cpu")
            assert all(param.requires_grad and param.device.type == "cpu" for param in loaded.parameters())
            for got, want in zip(loaded(text, image), expected):
                assert torch.equal(got, want)


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    from dalle_pipeline.components.sample.generate import filter_logits

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03 .01
    kept = filter_logits(logits, 1.0, top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    assert filter_logits(logits, 1.0, top_p=0.1).isfinite().sum() == 1


def test_guidance_mixes_conditional_and_null_caption_logits_and_prefix_is_kept():
    torch.manual_seed(0)
    model = Prior(CFG).eval()
    text, lengths = torch.randint(0, 50, (3, CFG.text_len)), torch.tensor([1, 2, 3])
    scale = 3.0
    greedy, _ = sample_image_tokens(model, text, lengths, torch.Generator().manual_seed(3), top_k=1,
                                    guidance_scale=scale)
    with torch.no_grad():
        first = []
        for caption_lengths in (lengths, torch.zeros_like(lengths)):
            cache = model.new_cache(3, torch.device("cpu"))
            first.append(model.step(model.input_text(model.pad_text(text, caption_lengths)), text[:, :0], cache, 0))
    conditional, unconditional = first
    expected = (unconditional + scale * (conditional - unconditional)).argmax(-1)
    assert torch.equal(greedy[:, 0], expected)
    assert not torch.equal(expected, conditional.argmax(-1)) or not torch.equal(expected, unconditional.argmax(-1))

    prefix = torch.randint(0, CFG.image_vocab, (3, CFG.grid_size))  # the top row of an image
    with_prefix, _ = sample_image_tokens(model, text, lengths, torch.Generator().manual_seed(3), image_prefix=prefix,
                                         guidance_scale=2.0)
    assert torch.equal(with_prefix[:, : CFG.grid_size], prefix)


@pytest.mark.parametrize("kind", ["row", "column"])
@pytest.mark.parametrize("text_len, grid", [(4, 3), (24, 8)])
def test_segment_attention_is_the_masked_attention_and_its_gradient(kind, text_len, grid):
    """In fp64, text-plus-segments attention and its hand-written backward equal plain attention under
    the layer's boolean mask, for a grid whose last position is missing (the prior's input)."""
    from dalle_pipeline.components.prior.attention import Segments, math_attention, segment_attention

    torch.manual_seed(0)
    cfg = PriorModelConfig(text_len=text_len, grid_size=grid)
    q, k, v = (torch.randn(2, 3, cfg.seq_len, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, cfg.seq_len, 8, dtype=torch.float64)
    reference = math_attention(q, k, v, build_mask(cfg, kind))
    segments = segment_attention(q, k, v, Segments(text_len + 1, grid, transpose=kind == "column"))
    torch.testing.assert_close(segments, reference, rtol=0, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(segments, (q, k, v), grad),
                            torch.autograd.grad(reference, (q, k, v), grad)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_segment_attention_refuses_a_sequence_that_does_not_fit_its_grid():
    from dalle_pipeline.components.prior.attention import Segments, segment_attention

    q = torch.randn(1, 1, 5 + 10, 8)
    with pytest.raises(ValueError, match="do not fit 5 text positions and a 3x3 grid"):
        segment_attention(q, q, q, Segments(5, 3, transpose=False))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_segments_backend_trains_like_the_boolean_masks_in_bf16(device):
    """The whole prior in bf16 autocast: the segments backend's loss and gradients match the
    boolean-mask path's within bf16 rounding (on CUDA this covers the CUDA flash kernels)."""
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"text_len": 8, "grid_size": 4, "layers": 4, "d_model": 64, "heads": 2})
    models = [Prior(cfg.model_copy(update={"attention_backend": backend})).to(device) for backend in ("segments", "sdpa")]
    models[1].load_state_dict(models[0].state_dict())
    text = torch.randint(0, cfg.text_vocab, (4, cfg.text_len), device=device)
    image = torch.randint(0, cfg.image_vocab, (4, cfg.image_len), device=device)
    losses = []
    for model in models:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = prior_loss(*model(text, image), text, image, 1 / 8)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    for (name, ours), theirs in zip(models[0].named_parameters(), models[1].parameters()):
        scale = theirs.grad.abs().max().item()
        assert (ours.grad - theirs.grad).abs().max().item() <= 0.025 * scale + 1e-6, name


def test_flops_per_token_count_the_weight_matrices_and_attention():
    """6N + 12·L·T·d, N the weight matrices: the blocks' 12·d² each and the two heads, no embeddings,
    biases or norms."""
    from dalle_pipeline.components.training.flops import transformer_flops_per_token

    d, layers = CFG.d_model, CFG.layers
    matrices = layers * 12 * d * d + d * (CFG.text_vocab + CFG.text_len) + d * CFG.image_vocab
    flops = transformer_flops_per_token(Prior(CFG), layers, CFG.seq_len, d)
    assert flops == 6 * matrices + 12 * layers * CFG.seq_len * d


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="this torch has no CUDA kernels to check against")
def test_the_cuda_flash_calls_fit_this_torchs_kernels_on_fake_cuda_tensors():
    """The CUDA branch of the segments attention, checked without a GPU: on fake CUDA tensors the
    flash kernels' shape functions take our arguments (their number, order and types) and give the
    shapes the merges expect."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dalle_pipeline.components.prior import attention

    with FakeTensorMode():
        q = torch.empty(2, 4, 1023, 64, device="cuda", dtype=torch.bfloat16)
        text = torch.empty(2, 4, 257, 64, device="cuda", dtype=torch.bfloat16)
        out, lse, saved = attention._flash_forward(q, text, text, False, 0.125)
        assert out.shape == q.shape and lse.shape == (2, 4, 1023) and lse.dtype == torch.float32
        grads = attention._flash_backward(out, q, text, text, out, lse, False, 0.125, saved)
        assert [g.shape for g in grads] == [q.shape, text.shape, text.shape]
        full = torch.empty(2, 4, 1280, 64, device="cuda", dtype=torch.bfloat16)
        layout = attention.Segments(257, 32, transpose=True)
        assert attention.segment_attention(full, full, full, layout).shape == full.shape
        position = torch.tensor(600, device="cuda")
        assert attention.segment_decode_attention(full[:, :, :1], full, full, layout, position).shape == (2, 4, 1, 64)


def test_sampling_batches_shrink_to_the_kv_cache_memory_given():
    """The paper's dims: a row's keys and values take 1.3 GB in bf16, so 128 rows (166 GB) cannot be one
    batch on an 80 GB GPU; the batch is what fits, and a budget below one row is refused, naming both."""
    from dalle_pipeline.components.config import PriorArchitecture, SampleConfig, resolve
    from dalle_pipeline.components.prior.model import KVCache
    from dalle_pipeline.components.sample.run import fitting_batch

    paper = resolve("paper")
    cfg = PriorModelConfig(**paper.prior.model_dump(include=set(PriorArchitecture.model_fields)),
                           text_vocab=16384, image_vocab=8192, text_len=256, grid_size=32)
    per_row = KVCache.bytes_per_row(cfg, torch.bfloat16)
    assert per_row == 2 * 64 * 1280 * 3968 * 2 and 128 * per_row > 160e9
    with torch.device("meta"):
        prior = Prior(cfg.model_copy(update={"layers": 1})).to(torch.bfloat16)  # its dtype, not its size
    prior.cfg = cfg
    weights = 12.3e9 * 2  # bf16 parameters on the same 80 GB
    rows = fitting_batch(SampleConfig(memory_gb=(80e9 - weights) / 2**30), prior, torch.device("cuda"))
    assert 1 <= rows < 128 and rows * per_row <= 80e9 - weights
    assert fitting_batch(SampleConfig(memory_gb=(80e9 - weights) / 2**30, guidance_scale=3.0), prior,
                         torch.device("cuda")) == rows // 2
    assert fitting_batch(SampleConfig(batch_size=8, memory_gb=1000), prior, torch.device("cuda")) == 8
    with pytest.raises(ValueError, match=r"one sequence's KV cache takes 1\.21 GiB, more than the 0\.50 GiB"):
        fitting_batch(SampleConfig(memory_gb=0.5), prior, torch.device("cuda"))
