"""The training loop on real gloo process groups of two ranks: DDP and FSDP2 synchronise gradients once
per update however many micro-batches it accumulates, and sharded (DCP) checkpoints resume on another
number of ranks, as do the whole-state checkpoints written before them."""

from __future__ import annotations

import pytest
import torch
from process_group import on_ranks
from torch import nn

from dalle_pipeline.components.config import OptimConfig

STEPS = 4


def _model(hidden: int) -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank and in every run
    return nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 16))


def _wrap(model: nn.Module, parallel: str) -> nn.Module:
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    return model


def _batches(rows: int, rank: int):
    """Rows of a regression drawn for `rank` (None: the same rows on every rank), forever."""
    generator = torch.Generator().manual_seed(1 if rank is None else 100 + rank)
    while True:
        x = torch.randn(rows, 16, generator=generator)
        yield x, x.flip(1).tanh()


def _loss(model, batch, step):
    x, y = batch
    return (model(x) - y).pow(2).mean(), {}


def _optim(accumulate: int = 1) -> OptimConfig:
    return OptimConfig(steps=STEPS, lr=1e-2, warmup_steps=0, grad_accum_steps=accumulate, log_every=STEPS,
                       precision="fp32", compile=False)


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from its shards where sharded: every rank calls this)."""
    from dalle_pipeline.components.training.loop import unwrap

    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for name, value in unwrap(model).named_parameters()}


def _synchronised_training(rank: int, parallel: str, accumulate: int):
    """(gradient reductions counted by the profiler, the weights after STEPS updates) of a run
    accumulating `accumulate` micro-batches of 8 // accumulate rows each, every rank its own rows."""
    from torch.profiler import ProfilerActivity, profile

    from dalle_pipeline.components.training import fit

    model = _wrap(_model(64), parallel)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fit(model, _loss, _micro_batches(rank, accumulate), _optim(accumulate))
    # DDP all-reduces its gradient buckets, FSDP2 reduce-scatters each sharded group's gradients (on gloo
    # through an all-reduce of its own, which clip_grad_norm_'s norm all-reduce would blur: not counted)
    wanted = "c10d::allreduce_" if parallel == "ddp" else "c10d::_reduce_scatter_base_"
    return sum(event.name == wanted for event in profiler.events()), _whole(model)


def _micro_batches(rank: int, accumulate: int):
    for x, y in _batches(8, rank):
        yield from zip(x.chunk(accumulate), y.chunk(accumulate))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_gradients_are_synchronised_once_per_update_however_many_micro_batches(tmp_path, parallel):
    """4 micro-batches of 2 rows reduce gradients as often as one batch of 8 (once per update: DDP's
    no_sync, FSDP2's set_requires_gradient_sync), and the updates are the same."""
    runs = {accumulate: on_ranks(_synchronised_training, 2, tmp_path / str(accumulate), parallel, accumulate)
            for accumulate in (1, 4)}
    per_update = {accumulate: [count / STEPS for count, _ in ranks] for accumulate, ranks in runs.items()}
    groups = 1 if parallel == "ddp" else 2  # DDP's one bucket; FSDP's first layer, and the root's last
    assert per_update[4] == per_update[1] == [groups, groups], per_update
    # Adam moves each weight by about lr (1e-2) an update, whatever its gradient's size: a wrong accumulation
    # moves most weights by that much; the two sums' rounding only where a gradient is near Adam's eps
    for name, value in runs[1][0][1].items():
        torch.testing.assert_close(runs[4][0][1][name], value, rtol=0, atol=1e-3)
    first, second = runs[4][0][1], runs[4][1][1]
    assert all(torch.equal(first[name], second[name]) for name in first), "the ranks' weights differ"


def _train_and_checkpoint(rank: int, parallel: str, directory, resumes: bool):
    """Train `parallel` on the same rows on every rank to update STEPS; at update 2 write the checkpoint
    folder `directory` as the Ray worker does (`ray_train.report_sharded`): every rank its shards into
    `sharded/` (DCP) and rank 0 the rest, or rank 0 the whole state dicts. Or, `resumes`, continue from
    that folder read as a restarted worker reads it (`ray_train.read_state`). (losses by update, the
    weights at update 2, the weights at STEPS)"""
    import torch.distributed as dist

    from dalle_pipeline.components.training import fit, sharded
    from dalle_pipeline.components.training.ray_train import SHARDED_DIR, STATE_FILE, read_state

    model = _wrap(_model(8192), parallel)  # wide enough that DCP's overhead per item is noise in file sizes
    saved = {}

    def on_checkpoint(step, state):
        if step != 2 or resumes:
            return
        if sharded.is_sharded_state(state):
            sharded.save(directory / SHARDED_DIR, {key: state.pop(key) for key in ("model", "optimizer")})
        if rank == 0:
            torch.save(state, directory / STATE_FILE)
        saved.update(_whole(model))
        dist.barrier()

    batches = _batches(8, None)
    resume = {**read_state(directory), "rng": None} if resumes else None
    for _ in range(2 if resumes else 0):
        next(batches)
    result = fit(model, _loss, batches, _optim().model_copy(update={"log_every": 1}), resume_state=resume,
                 on_checkpoint=on_checkpoint, checkpoint_every=1)
    return {row["step"]: row["loss"] for row in result.history}, saved, _whole(model)


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_as_the_unbroken_run_continues(tmp_path):
    """Two FSDP ranks write a DCP checkpoint at update 2, each its own file holding half the weights and
    Adam moments; one rank resumes from it and continues the two-rank run's losses and weights. The
    driver's export reads the same weights back without a process group."""
    from dalle_pipeline.components.training import sharded

    directory = tmp_path / "checkpoint"
    directory.mkdir()
    losses, saved, final = on_ranks(_train_and_checkpoint, 2, tmp_path / "two", "fsdp", directory, False)[0]
    files = sorted((directory / "sharded").glob("*.distcp"))
    assert [f.name for f in files] == ["__0_0.distcp", "__1_0.distcp"]
    numel = sum(value.numel() for value in saved.values())
    for file in files:  # weights and two Adam moments, fp32: 12 bytes a parameter, half on each rank
        assert 0.45 < file.stat().st_size / (12 * numel) < 0.55, (file.name, file.stat().st_size, numel)

    resumed_losses, _, resumed_final = on_ranks(_train_and_checkpoint, 1, tmp_path / "one", "fsdp", directory,
                                                True)[0]
    assert sorted(resumed_losses) == [3, 4]
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5)
    for name, value in final.items():
        torch.testing.assert_close(resumed_final[name], value, rtol=1e-5, atol=1e-6)

    layout = sharded.saved_layout(directory / "sharded")
    exported = dict(sharded.saved_weights(directory / "sharded", layout, group_bytes=1))  # a tensor a read
    assert list(exported) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(exported[name], value), name


def test_a_checkpoint_of_whole_state_dicts_still_resumes_a_sharded_model(tmp_path):
    """Checkpoints written before sharded ones hold whole state dicts (a DDP run's still do), the
    optimizer's numbered, not named: two FSDP ranks resume from one a single process wrote and continue
    its run."""
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    losses, _, final = on_ranks(_train_and_checkpoint, 1, tmp_path / "one", "none", directory, False)[0]
    assert not (directory / "sharded").exists()
    for resumed_losses, _, resumed_final in on_ranks(_train_and_checkpoint, 2, tmp_path / "two", "fsdp",
                                                     directory, True):
        assert resumed_losses[3] == pytest.approx(losses[3], rel=1e-5)
        assert resumed_losses[4] == pytest.approx(losses[4], rel=1e-5)
        for name, value in final.items():
            torch.testing.assert_close(resumed_final[name], value, rtol=1e-5, atol=1e-6)
