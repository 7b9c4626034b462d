"""The one training loop: metrics read once per log window, and a non-finite loss stops it."""

import pytest
import torch
from torch import nn

from dalle_pipeline.components.config import OptimConfig
from dalle_pipeline.components.training import fit


def _regression_batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(16, 4, generator=generator)
        yield x, x.sum(dim=1, keepdim=True)


def _loss_fn(nan_at_step: int | None = None):
    def loss_fn(model, batch, step):
        x, y = batch
        error = (model(x) - y).pow(2).mean()
        if step == nan_at_step:
            error = error * float("nan")
        return error, {"error_tensor": error.detach(), "step_float": float(step)}

    return loss_fn


def test_tensor_metrics_are_averaged_over_the_window_and_logged_as_floats():
    torch.manual_seed(0)
    logged = []
    result = fit(nn.Linear(4, 1), _loss_fn(), _regression_batches(),
                 OptimConfig(steps=6, lr=0.1, warmup_steps=0, log_every=3),
                 on_log=lambda step, metrics: logged.append((step, metrics)))
    assert [step for step, _ in logged] == [3, 6]
    for _, metrics in logged:
        assert all(type(value) is float for value in metrics.values()), metrics
        assert metrics["error_tensor"] == pytest.approx(metrics["loss"])
    assert logged[0][1]["step_float"] == 1.0 and logged[1][1]["step_float"] == 4.0  # means of 0,1,2 and 3,4,5
    assert logged[1][1]["loss"] < logged[0][1]["loss"]
    assert result.history[-1]["loss"] == logged[-1][1]["loss"]


def test_a_submodule_clipped_separately_does_not_scale_the_models_gradients_down():
    """An adversary with huge gradients (the dVAE's discriminator): clipped together with it, the
    model's own gradient shrinks to almost nothing; clipped apart, each group is held to grad_clip."""

    def clipped(clip_separately):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        model.adversary = nn.Linear(4, 1)

        def loss_fn(current, batch, step):
            x, y = batch
            return (current(x) - y).pow(2).mean() + 1e6 * current.adversary(x).pow(2).mean(), {}

        logged = []
        fit(model, loss_fn, _regression_batches(), OptimConfig(steps=1, lr=0.1, warmup_steps=0, log_every=1),
            clip_separately=clip_separately, on_log=lambda step, metrics: logged.append(metrics))
        own = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]).norm()
        return float(own), logged[0]

    own_apart, metrics = clipped(("adversary",))
    assert metrics["grad_norm_adversary"] > 1e3 and 0.1 < metrics["grad_norm"] < 1e3
    assert own_apart == pytest.approx(min(1.0, metrics["grad_norm"]), rel=1e-4)  # grad_clip 1.0
    own_together, metrics = clipped(())
    assert "grad_norm_adversary" not in metrics and metrics["grad_norm"] > 1e3
    assert own_together < 1e-3 * own_apart


def test_a_non_finite_loss_stops_training_before_anything_is_logged_or_saved_from_it():
    saved, logged = [], []
    with pytest.raises(FloatingPointError, match=r"not finite \(nan or inf\) in steps 5\.\.6"):
        fit(nn.Linear(4, 1), _loss_fn(nan_at_step=4), _regression_batches(),
            OptimConfig(steps=10, lr=0.1, warmup_steps=0, log_every=3),
            on_log=lambda step, metrics: logged.append(step),
            on_checkpoint=lambda step, state: saved.append(step), checkpoint_every=2)
    # fit's steps count from 0, reports from 1: the nan came in update 5, between the checks at 4 and 6
    assert logged == [3] and saved == [2, 4]


def test_fit_resumed_at_step_k_ends_bit_identical_to_an_unbroken_run():
    """The in-process guard of the kill-and-resume tests: dropout (torch RNG), EMA, warmup + cosine,
    gradient accumulation and the data iterator all continue exactly from a step-k checkpoint."""
    import copy

    from dalle_pipeline.components.training import TensorBatches

    cfg = OptimConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, grad_accum_steps=2, log_every=4)
    data = (torch.randn(64, 4, generator=torch.Generator().manual_seed(1)),)

    def loss_fn(model, batch, step):
        (x,) = batch
        return (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean(), {}

    def fresh_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))

    def batches(from_step: int):
        return TensorBatches(data, 8, seed=3).from_step(from_step * cfg.grad_accum_steps)

    saved = {}
    unbroken = fit(fresh_model(), loss_fn, batches(0), cfg, checkpoint_every=5,
                   on_checkpoint=lambda step, state: saved.setdefault(step, copy.deepcopy(state)))
    torch.manual_seed(123)  # whatever the process did in between: the checkpoint's RNG state is what counts
    resumed = fit(fresh_model(), loss_fn, batches(5), cfg, resume_state=saved[5])
    assert resumed.step == unbroken.step == 12
    for name, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in unbroken.ema_model.state_dict().items():
        assert torch.equal(value, resumed.ema_model.state_dict()[name]), name
    # and the guard guards: resuming without the RNG state draws other dropout masks, other weights
    no_rng = fit(fresh_model(), loss_fn, batches(5), cfg, resume_state={**saved[5], "rng": None})
    assert not torch.equal(no_rng.model[0].weight, unbroken.model[0].weight)
