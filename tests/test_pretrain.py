"""SimCLR pretraining: distributed equality, resume equality, checkpoints, CLI, bad input."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from ssl3d_cli import checkpoints
from ssl3d_cli.cli.app import app
from ssl3d_cli.config import ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.errors import CheckpointError, ConfigError, InputDataError, StopRequested
from ssl3d_cli.losses.ntxent import nt_xent
from ssl3d_cli.models.unet import SimCLRModel
from ssl3d_cli.runtime.distributed import all_gather_with_grad

runner = CliRunner()
TINY = ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8)


def _views(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, 8, generator=g), torch.randn(n, 1, 8, 8, 8, generator=g)


def _loss_and_grads(model, v1, v2, groups, rows, temperature=0.05):
    n = v1.shape[0]
    z = model(torch.cat([v1, v2]))
    z1, z2 = all_gather_with_grad(z[:n]), all_gather_with_grad(z[n:])
    loss, _ = nt_xent(z1, z2, temperature=temperature, groups=groups, rows=rows)
    model.zero_grad()
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, out_dir, negatives):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = SimCLRModel(TINY)
    v1, v2 = _views()
    n = v1.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    groups = torch.arange(v1.shape[0]) // 4 if negatives == "volume" else None
    loss, grads = _loss_and_grads(model, v1[mine], v2[mine], groups, slice(rank * n, (rank + 1) * n))
    for g in grads.values():  # what DistributedDataParallel does: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    total = loss.clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": grads}, Path(out_dir) / "dist.pt")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("negatives", ["batch", "volume"])
def test_two_gloo_processes_equal_one_process(tmp_path, negatives):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), negatives), nprocs=2, join=True)
    dist_out = torch.load(tmp_path / "dist.pt", weights_only=True)
    torch.manual_seed(0)
    model = SimCLRModel(TINY)
    v1, v2 = _views()
    groups = torch.arange(v1.shape[0]) // 4 if negatives == "volume" else None
    loss, grads = _loss_and_grads(model, v1, v2, groups, None)
    assert float(dist_out["loss"]) == pytest.approx(float(loss), abs=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(dist_out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def _config(epochs=4, **kw):
    return PretrainConfig(epochs=epochs, batch_size=2, patches_per_side=1, warmup_epochs=1, checkpoint_every=2, workers=0,
                          model=TINY, **kw)


RUNTIME = RuntimeConfig(device="cpu", seed=3, threads=1, deterministic=True)


def _weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)["model"]


def test_resume_after_kill_and_after_sigterm_equals_uninterrupted(ct_cache, tmp_path, interrupts):
    import importlib

    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    stage.pretrain(ct_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "full")
    reference = _weights(tmp_path / "full")

    # 1) "SIGKILL" after epoch 3's metrics: the last checkpoint is epoch 2; resume redoes epochs 3-4
    with interrupts.crash_after_logging_epoch(3), pytest.raises(KeyboardInterrupt):
        stage.pretrain(ct_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] == 2
    stage.pretrain(ct_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "killed", resume=True)
    for k, v in _weights(tmp_path / "killed").items():
        assert torch.equal(v, reference[k]), k
    epochs = [json.loads(ln)["epoch"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # the redone epoch 3 is logged once

    # 2) SIGTERM in the middle of epoch 2: state saved mid-epoch, exit 75, resume equals too
    with interrupts.sigterm_at_step(3), pytest.raises(StopRequested) as info:
        stage.pretrain(ct_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "term")
    assert info.value.exit_code == 75
    saved = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3)
    stage.pretrain(ct_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "term", resume=True)
    for k, v in _weights(tmp_path / "term").items():
        assert torch.equal(v, reference[k]), k


def test_encoder_checkpoint_is_weights_only_and_typed(ct_cache, tmp_path):
    from ssl3d_cli.stages.pretrain import pretrain

    pretrain(ct_cache, config=_config(epochs=1), runtime=RUNTIME, output=tmp_path / "r")
    enc = torch.load(tmp_path / "r" / "encoder.pt", weights_only=True)
    assert enc["format"] == "ssl3d-encoder" and enc["architecture"] == {"in_channels": 1, "widths": [4, 8]}
    assert enc["dataset"]["preprocess"]["size"] == [16, 16, 16] and "blocks.0.0.weight" in enc["state_dict"]  # schema 2: one dataset record
    with pytest.raises(CheckpointError, match="training state.*expected a pretrained SimCLR encoder"):
        checkpoints.load_checkpoint(tmp_path / "r" / "last.pt", fmt=checkpoints.ENCODER)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt", fmt=checkpoints.ENCODER)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["pretrain"]["temperature"] == 0.05


def test_resume_refuses_other_settings_and_missing_checkpoint(ct_cache, tmp_path):
    from ssl3d_cli.stages.pretrain import pretrain

    pretrain(ct_cache, config=_config(epochs=1), runtime=RUNTIME, output=tmp_path / "r")
    with pytest.raises(ConfigError, match="temperature: checkpoint 0.05 vs now 0.1"):
        pretrain(ct_cache, config=_config(epochs=2, temperature=0.1), runtime=RUNTIME, output=tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="last.pt not found"):
        pretrain(ct_cache, config=_config(epochs=2), runtime=RUNTIME, output=tmp_path / "other", resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(ct_cache, config=_config(epochs=2), runtime=RUNTIME, output=tmp_path / "r")


def test_bad_settings(ct_cache, tmp_path):
    from ssl3d_cli.stages.pretrain import pretrain

    with pytest.raises(ConfigError, match="--temperature"):
        pretrain(ct_cache, config=_config(temperature=0.0), runtime=RUNTIME, output=tmp_path / "a")
    with pytest.raises(ConfigError, match="--patches-per-side 3"):
        pretrain(ct_cache, config=PretrainConfig(patches_per_side=3, model=TINY), runtime=RUNTIME, output=tmp_path / "b")
    one = tmp_path / "one"
    from ssl3d_cli.stages.preprocess import preprocess
    from ssl3d_cli.stages.synth import synth

    synth(one, cases=1, unlabelled=0, shape=(16, 16, 12))
    preprocess(one, config=PreprocessConfig(size=(16, 16, 16)), cache_dir=tmp_path / "c1")
    with pytest.raises(InputDataError, match="at least 2 scans"):
        pretrain(tmp_path / "c1", config=_config(), runtime=RUNTIME, output=tmp_path / "c")


def test_cli_two_epochs_loss_goes_down_and_device_errors(ct_dataset, tmp_path):
    args = ["pretrain", str(ct_dataset), "--size", "16", "--epochs", "6", "--batch-size", "4", "--patches-per-side", "1",
            "--widths", "8,16", "--workers", "0", "--device", "cpu", "--warmup-epochs", "1", "--lr", "3e-3",
            "--augmentations", "colour,noise", "--temperature", "0.5", "-o", str(tmp_path / "run"), "--json", "--seed", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and out["epochs"] == 6
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (tmp_path / "run" / "pretrain.log").read_text()
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["pretrain", str(ct_dataset), "--device", "cuda", "--size", "16"])
        assert r.exit_code != 0 and "no CUDA GPU" in r.output and "Traceback" not in r.output


def test_torchrun_two_cpu_processes_pretrain_resume_and_finetune(ct_cache, tmp_path):
    """The real multi-process path: torchrun, gloo, DDP, rank-0 writes, resume, freeze/unfreeze re-wrap."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "ssl3d_cli"]
    common = ["--size", "16", "--widths", "4,8", "--workers", "0", "--device", "cpu", "--threads", "1", "--json"]
    pre = base + ["pretrain", str(ct_cache), "--patches-per-side", "1", "--batch-size", "2", "--checkpoint-every", "1", "-o", str(tmp_path / "pre")]
    r = subprocess.run(pre + common + ["--epochs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["patches_per_step"] == 4  # 2 scans x 1 patch x 2 ranks
    r = subprocess.run(pre + common + ["--epochs", "2", "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    ft = base + ["finetune", str(ct_cache), "--encoder", str(tmp_path / "pre" / "encoder.pt"), "--epochs", "2", "--freeze-epochs", "1",
                 "--batch-size", "1", "-o", str(tmp_path / "ft")]
    r = subprocess.run(ft + common, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ft" / "model.pt").exists() and (tmp_path / "ft" / "test_metrics.json").exists()
    assert [json.loads(ln)["encoder_frozen"] for ln in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()] == [True, False]


def test_out_of_memory_names_the_option_to_lower():
    from ssl3d_cli.errors import DeviceError
    from ssl3d_cli.training.run import optimisation_step

    def compute():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(DeviceError, match="out of memory; lower --batch-size \\(now 4\\)"):
        optimisation_step(compute, optimizer=None, scheduler=None, scaler=None, oom_hint="lower --batch-size (now 4)")
    with pytest.raises(RuntimeError, match="other"):
        optimisation_step(lambda: (_ for _ in ()).throw(RuntimeError("other")), optimizer=None, scheduler=None, scaler=None, oom_hint="x")
