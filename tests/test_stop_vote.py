"""StopVote: a stop signal on any rank stops every rank at the same step, one step late, without a host wait per step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from ssl3d_cli.runtime.distributed import StopVote

RANK_SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
from ssl3d_cli.runtime.distributed import StopVote

flag_rank, flag_step = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
votes = StopVote(torch.device("cpu"))
answers = [votes(rank == flag_rank and step == flag_step) for step in range(6)]
last = votes.close()
dist.destroy_process_group()
print(json.dumps({"rank": rank, "answers": answers, "last": last}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(flag_rank: int, flag_step: int) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(flag_rank), str(flag_step)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["rank"])


def test_a_lone_process_stops_at_once():
    votes = StopVote(torch.device("cpu"))
    assert [votes(step == 2) for step in range(4)] == [False, False, True, False]
    assert votes.close() is False


def test_every_rank_stops_one_step_after_any_rank_asks():
    for r in _two_ranks(flag_rank=1, flag_step=2):
        assert r["answers"] == [False, False, False, True, False, False], r
        assert r["last"] is False
    for r in _two_ranks(flag_rank=0, flag_step=5):  # asked during the last step: only close() sees it, on every rank
        assert r["answers"] == [False] * 6 and r["last"] is True, r


RUN_SCRIPT = r"""
import importlib, os, signal, sys
from pathlib import Path
from ssl3d_cli.config import ModelConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.errors import StopRequested

stage = importlib.import_module("ssl3d_cli.stages.pretrain")

cache, out, mode, at_call = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "term" and os.environ["RANK"] == "1":  # SIGTERM reaches rank 1 only, during its at_call-th step
    real, calls = stage.simclr_loss, {"n": 0}

    def signalling(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    stage.simclr_loss = signalling
config = PretrainConfig(epochs=2, batch_size=1, patches_per_side=1, warmup_epochs=1, checkpoint_every=1, workers=0,
                        steps_per_epoch=4, model=ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8))
try:
    stage.pretrain(cache, config=config, runtime=RuntimeConfig(device="cpu", seed=3, threads=1), output=Path(out),
                   resume=mode == "resume")
except StopRequested:
    sys.exit(75)
"""


@pytest.mark.parametrize(("at_call", "stopped_at"), [(2, (0, 3)), (4, (0, 4))])
def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resume_equals_uninterrupted(ct_cache, tmp_path, at_call, stopped_at):
    """Flagged in step 2 (1-based, of 4 per epoch) on rank 1: both ranks stop after step 3. Flagged in the epoch's last
    step: both stop at its end, before the epoch's bookkeeping. Either way the resumed run ends with the same weights."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: str, mode: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               str(script), str(ct_cache), str(tmp_path / out), mode, str(at_call)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    r = torchrun("full", "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("term", "term")
    assert r.returncode != 0 and "exitcode  : 75" in r.stderr, r.stderr[-3000:]  # both workers exited 75 (torchrun: 1)
    saved = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == stopped_at
    r = torchrun("term", "resume")
    assert r.returncode == 0, r.stderr[-3000:]
    done = torch.load(tmp_path / "term" / "last.pt", weights_only=True)["model"]
    for k, v in torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(v, done[k]), k
