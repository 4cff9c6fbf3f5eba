"""StopVote: a stop signal on any rank stops every rank at the same step, one step late, without a host wait per step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
