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


def test_a_non_finite_loss_stops_training_before_anything_is_logged_or_saved_from_it():
    saved, logged = [], []
    with pytest.raises(FloatingPointError, match=r"not finite \(nan or inf\) in steps 5\.\.6"):
        fit(nn.Linear(4, 1), _loss_fn(nan_at_step=4), _regression_batches(),
            OptimConfig(steps=10, lr=0.1, warmup_steps=0, log_every=3),
            on_log=lambda step, metrics: logged.append(step),
            on_checkpoint=lambda step, state: saved.append(step), checkpoint_every=2)
    # fit's steps count from 0, reports from 1: the nan came in update 5, between the checks at 4 and 6
    assert logged == [3] and saved == [2, 4]
