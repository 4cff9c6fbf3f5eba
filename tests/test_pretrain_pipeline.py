"""The training loop's data path: device prefetch and prepare ahead, per-epoch metrics without per-step host syncs,
DataLoader workers over the whole run."""

import functools
import importlib
import json
from pathlib import Path

import pytest
import torch

from ssl3d_cli.config import ModelConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.training.data import DevicePrefetcher
from ssl3d_cli.training.run import StepMetrics

TINY = ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8)
RUNTIME = RuntimeConfig(device="cpu", seed=5, threads=1, deterministic=True)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 1, 4, 4, 4, generator=g) for _ in range(3)] + [(torch.randn(2, 3, generator=g), torch.arange(2))]


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def test_prefetcher_keeps_every_batch_in_order_on_cpu():
    batches = _batches()
    out = list(DevicePrefetcher(batches, torch.device("cpu")))
    assert len(out) == len(batches) and all(_same(a, b) for a, b in zip(out, batches))
    assert list(DevicePrefetcher([], torch.device("cpu"))) == []


def test_prefetcher_prepares_each_batch_with_its_index_on_cpu():
    batches = _batches()[:3]
    seen = []

    def prepare(index, batch):
        seen.append(index)
        return batch * 2, index

    out = list(DevicePrefetcher(batches, torch.device("cpu"), prepare=prepare))
    assert seen == [0, 1, 2] and [i for _, i in out] == [0, 1, 2]
    assert all(torch.equal(p, 2 * b) for (p, _), b in zip(out, batches))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_prepares_ahead_on_the_copy_stream_without_races():
    """prepare (a chain of kernels on the copy stream) runs beside a long step on the compute stream; what the step reads
    is complete, and its memory is not reused by the next prepare while the step still runs."""
    dev = torch.device("cuda")
    batches = [torch.full((4, 1, 32, 32, 32), float(i)).pin_memory() for i in range(5)]

    def prepare(index, batch):
        out = batch
        for _ in range(20):  # many kernels: a race would show as a partly written tensor
            out = out * 1.0 + 0.5
        return out - 10.0, index

    sums = []
    for views, index in DevicePrefetcher(batches, dev, prepare=prepare):
        torch.cuda._sleep(2_000_000)  # the step, long enough for the next prepare to run meanwhile
        sums.append((index, views.double().sum()))
    torch.cuda.synchronize()
    for index, total in sums:
        assert float(total) == pytest.approx(float(index) * 4 * 32**3, abs=1e-6), index


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pretraining_with_views_prepared_ahead_equals_inline(ct_cache, tmp_path, monkeypatch):
    """The views made a step ahead on the copy stream are those made inside each step (a race would garble them)."""
    from ssl3d_cli.training import run as run_module

    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    real = stage.simclr_loss
    config = PretrainConfig(epochs=2, batch_size=2, patches_per_side=2, warmup_epochs=1, checkpoint_every=2, workers=0,
                            compile="off", model=TINY)
    runtime = RuntimeConfig(device="cuda", seed=1, deterministic=True)
    seen: dict[str, list[torch.Tensor]] = {"ahead": [], "inline": []}

    class Inline(DevicePrefetcher):
        def __iter__(self):  # each batch copied and prepared on the compute stream, just before its step
            for index, batch in enumerate(self.batches):
                yield self._ready(index, batch)

    for name in seen:
        def recording(model, views, _name=name, **kw):
            seen[_name].append(views.detach().cpu())
            return real(model, views, **kw)

        monkeypatch.setattr(stage, "simclr_loss", recording)
        if name == "inline":
            monkeypatch.setattr(run_module, "DevicePrefetcher", Inline)
        stage.pretrain(ct_cache, config=config, runtime=runtime, output=tmp_path / name)
    assert len(seen["ahead"]) == len(seen["inline"]) > 2
    for a, b in zip(seen["ahead"], seen["inline"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_keeps_every_batch_in_order_on_cuda():
    batches = [b.pin_memory() if isinstance(b, torch.Tensor) else tuple(t.pin_memory() for t in b) for b in _batches()]
    dev = torch.device("cuda")
    out = []
    for b in DevicePrefetcher(batches, dev):
        out.append(b if isinstance(b, torch.Tensor) else tuple(b))
        torch.cuda._sleep(1_000_000)  # a long "step" on the compute stream while the next batch is copied
    torch.cuda.synchronize()
    assert len(out) == len(batches)
    for a, b in zip(out, batches):
        assert _same(tuple(t.cpu() for t in a) if isinstance(a, tuple) else a.cpu(), b)
        assert all(t.device.type == "cuda" for t in (a if isinstance(a, tuple) else (a,)))


def test_step_metrics_equal_the_per_step_float_accumulation_and_survive_a_save():
    """Device sums converted once per epoch give what converting every step to a Python float gave, and a mid-epoch
    save (plain floats in last.pt) continued by a resumed run gives the same epoch means as an uninterrupted one."""
    g = torch.Generator().manual_seed(1)
    steps = [{"loss": torch.rand((), generator=g) * 5, "acc": torch.rand((), generator=g)} for _ in range(37)]
    old = {"loss": 0.0, "n": 0}
    for s in steps:  # what TrainingRun.fit did before: a host sync and a float per figure per step
        for k, v in s.items():
            old[k] = old.get(k, 0.0) + float(v)
        old["n"] += 1
    expected = {k: v / old["n"] for k, v in old.items() if k != "n"}

    whole = StepMetrics(torch.device("cpu"))
    for s in steps:
        whole.add(s)
    means = whole.means()
    assert means.keys() == expected.keys()
    for k in expected:
        assert means[k] == pytest.approx(expected[k], rel=1e-12, abs=0)

    first = StepMetrics(torch.device("cpu"))
    for s in steps[:20]:
        first.add(s)
    saved = json.loads(json.dumps(first.floats()))  # plain floats, as last.pt keeps them
    assert saved["n"] == 20 and all(isinstance(v, (int, float)) for v in saved.values())
    resumed = StepMetrics(torch.device("cpu"), saved)
    for s in steps[20:]:
        resumed.add(s)
    for k, v in resumed.means().items():
        assert v == pytest.approx(means[k], rel=1e-12, abs=0)
    assert StepMetrics(torch.device("cpu")).means() == {"loss": 0.0}  # an old checkpoint's empty accum loads as before


def test_logged_epoch_metrics_are_the_means_of_the_step_figures(ct_cache, tmp_path, monkeypatch):
    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    real = stage.simclr_loss
    seen: list[tuple[float, float]] = []

    def recording(*a, **kw):
        loss, acc = real(*a, **kw)
        seen.append((float(loss.detach()), float(acc)))
        return loss, acc

    monkeypatch.setattr(stage, "simclr_loss", recording)
    config = PretrainConfig(epochs=2, batch_size=3, patches_per_side=1, warmup_epochs=1, checkpoint_every=2, workers=0, model=TINY)
    stage.pretrain(ct_cache, config=config, runtime=RUNTIME, output=tmp_path / "run")
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(seen) // 2
    assert len(lines) == 2 and per_epoch * 2 == len(seen) and per_epoch > 1
    for e, line in enumerate(lines):
        chunk = seen[e * per_epoch:(e + 1) * per_epoch]
        assert line["loss"] == pytest.approx(sum(x[0] for x in chunk) / per_epoch, rel=1e-6)
        assert line["top1"] == pytest.approx(sum(x[1] for x in chunk) / per_epoch, rel=1e-6)


def _weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)["model"]


def test_workers_over_the_whole_run_train_exactly_as_the_main_process(ct_cache, tmp_path):
    """Workers reading one pass over all epochs (RunBatches) still see each epoch's seeded order (the sampler runs in
    the main process): the weights equal those of a run that reads in the main process."""
    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    for workers in (0, 2):
        config = PretrainConfig(epochs=3, batch_size=2, patches_per_side=1, warmup_epochs=1, checkpoint_every=3, workers=workers, model=TINY)
        stage.pretrain(ct_cache, config=config, runtime=RUNTIME, output=tmp_path / f"w{workers}")
    reference = _weights(tmp_path / "w0")
    for k, v in _weights(tmp_path / "w2").items():
        assert torch.equal(v, reference[k]), k


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ALL = ("rotate", "colour", "identity", "noise", "blur", "sobel", "cutout")


class _NoSync:
    """Inside: any operation that makes the host wait for the GPU raises (torch.cuda.set_sync_debug_mode)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_cuda_views_need_no_host_sync_and_match_the_subset_strategy():
    from ssl3d_cli.augment.simclr import augment_view

    x = torch.randn(16, 1, 16, 16, 16, device="cuda")
    augment_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(0))  # first call: constants copied once
    with _NoSync():
        for seed in range(3):
            augment_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(seed))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # blur's convolutions in full float32 for both
    try:
        blended = augment_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(2))
        subset = augment_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(2), blend=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(blended, subset, atol=1e-4, rtol=1e-4)  # cuDNN may pick other kernels for a smaller batch


@CUDA
def test_cuda_pretraining_step_needs_no_host_sync():
    from ssl3d_cli.models.unet import SimCLRModel
    from ssl3d_cli.runtime.device import resolve_precision
    from ssl3d_cli.runtime.distributed import DistInfo
    from ssl3d_cli.stages.pretrain import simclr_step_loss
    from ssl3d_cli.training.run import optimisation_step

    dev = torch.device("cuda")
    config = PretrainConfig(batch_size=2, patches_per_side=2, model=TINY)
    model = SimCLRModel(TINY).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    precision = resolve_precision("bf16", dev)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    volumes = torch.randn(2, 1, 32, 32, 32, device=dev)
    sums = StepMetrics(dev)
    for step in range(3):  # the first one allocates, autotunes and copies the augmentation constants
        gen = torch.Generator(device=dev).manual_seed(step)
        compute = functools.partial(simclr_step_loss, model, volumes, config=config, gen=gen, precision=precision, dist=DistInfo())
        if step == 0:
            optimisation_step(compute, optimizer=opt, scheduler=sched, scaler=scaler, oom_hint="")
            continue
        with _NoSync():
            loss, acc = optimisation_step(compute, optimizer=opt, scheduler=sched, scaler=scaler, oom_hint="")
            sums.add({"loss": loss, "acc": acc})
    assert all(torch.isfinite(torch.tensor(v)) for v in sums.means().values())


@CUDA
def test_cuda_pretraining_with_workers_and_prefetch(ct_cache, tmp_path):
    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    config = PretrainConfig(epochs=2, batch_size=2, patches_per_side=1, warmup_epochs=1, checkpoint_every=2, workers=2, model=TINY)
    stage.pretrain(ct_cache, config=config, runtime=RuntimeConfig(device="cuda", seed=1), output=tmp_path / "run")
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all(m["loss"] == m["loss"] and m["loss"] > 0 for m in lines)


def test_run_batches_are_the_epochs_batches_end_to_end_and_know_their_step():
    from ssl3d_cli.training.sampling import EpochBatches, RunBatches

    def epoch_order(epoch, start=0):
        b = EpochBatches(10, 3, seed=4, world=2, rank=1)
        b.set_epoch(epoch, start)
        return list(b)

    batches = EpochBatches(10, 3, seed=4, world=2, rank=1)  # 2 steps per epoch (12 items per step, wrapping)
    whole = RunBatches(batches, start_epoch=0, start_step=0, end_epoch=3)
    assert list(whole) == epoch_order(0) + epoch_order(1) + epoch_order(2) and len(whole) == 6
    assert [whole.position(i) for i in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    resumed = RunBatches(EpochBatches(10, 3, seed=4, world=2, rank=1), start_epoch=1, start_step=1, end_epoch=3)
    assert list(resumed) == epoch_order(1, 1) + epoch_order(2) and len(resumed) == 3  # the tail of the same order
    assert [resumed.position(i) for i in range(3)] == [(1, 1), (2, 0), (2, 1)]
    assert len(RunBatches(batches, start_epoch=3, start_step=0, end_epoch=3)) == 0 and not list(RunBatches(batches, start_epoch=3, start_step=0, end_epoch=3))
