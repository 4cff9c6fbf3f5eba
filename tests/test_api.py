"""The Python API as documented, the on-disk contract across schema versions, and the shared helpers' homes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl3d_cli import checkpoints
from ssl3d_cli.config import ModelConfig, PreprocessConfig
from ssl3d_cli.data.splits import make_split, read_split, split_cases, write_split
from ssl3d_cli.errors import CheckpointError, InputDataError
from ssl3d_cli.models.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("synth", "preprocess", "pretrain", "finetune", "predict", "uncertainty", "evaluate", "demo", "experiment")


@pytest.mark.parametrize("first", ["submodules", "package"])
def test_stage_names_are_functions_in_any_import_order(first):
    """``from ssl3d_cli.stages import X`` gives the function even after ``ssl3d_cli.stages.X`` (the module) was imported."""
    modules = "; ".join(f"import ssl3d_cli.stages.{s}" for s in STAGES)
    names = f"from ssl3d_cli.stages import {', '.join(STAGES)}"
    code = f"{modules}; {names}" if first == "submodules" else f"{names}; {modules}; {names}"
    code += f"; import types; bad = [n for n in {STAGES!r} if not isinstance(globals()[n], types.FunctionType)]; assert not bad, bad"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_python_api_example_runs(tmp_path):
    """examples/python_api.py, the README's API example, runs end to end (tiny sizes)."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path / "work"), "--tiny"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("test Dice (deterministic): ") and lines[1].startswith("test Dice (MC dropout, weighted-probs): ")
    assert 0.0 <= float(lines[1].split(": ")[1]) <= 1.0
    assert (tmp_path / "work" / "uncertainty" / "synthct_016_organ_p95.nii.gz").exists()


def _schema1_segmenter(path: Path) -> Path:
    """A model.pt as ssl3d wrote it before the dataset record (checkpoint schema 1: six loose dataset fields)."""
    config = ModelConfig(in_channels=1, widths=(4, 8))
    net = UNet(config, 3)
    payload = {
        "format": checkpoints.SEGMENTER, "schema_version": 1, "tool_version": "0.1.0", "model": config.to_dict(), "num_classes": 3,
        "state_dict": net.state_dict(), "preprocess": PreprocessConfig(size=(16, 16, 16)).to_dict(), "modality": "ct",
        "channel_names": ["CT"], "class_names": ["background", "organ", "lesion"], "label_values": [0, 1, 4], "regions": {},
        "dataset": {"cache": "/old/cache", "dataset": "Task99_Old", "modality": "ct", "channels": ["CT"], "classes": ["background", "organ", "lesion"],
                    "label_values": [0, 1, 4], "cases": 10, "labelled": 8, "size": [16, 16, 16], "settings_hash": "abc123"},
        "training": {}, "epoch": 1, "val_dice": 0.5, "encoder": None,
    }
    torch.save(payload, path)
    return path


def test_schema1_model_still_loads_as_one_dataset_record(tmp_path):
    from ssl3d_cli.inference.pipeline import load_segmenter
    from ssl3d_cli.runtime.device import resolve_precision

    path = _schema1_segmenter(tmp_path / "model.pt")
    seg = load_segmenter(path, device=torch.device("cpu"), precision=resolve_precision("fp32", torch.device("cpu")))
    d = seg.dataset
    assert (d.name, d.modality, d.channel_names, d.class_names, d.label_values) == (
        "Task99_Old", "ct", ("CT",), ("background", "organ", "lesion"), (0, 1, 4))
    assert d.size == (16, 16, 16) and d.preprocess_config().size == (16, 16, 16) and d.settings_hash == "abc123"
    assert d.class_index("lesion") == 2 and d.class_index("4") == 2
    assert "label_values" not in seg.payload and seg.payload["schema_version"] == 2


def test_unknown_checkpoint_schema_is_refused_with_the_fix(tmp_path):
    path = _schema1_segmenter(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "schema_version": 99}, path)
    with pytest.raises(CheckpointError, match="schema 99 is not one this ssl3d reads .*retrain"):
        checkpoints.load_checkpoint(path, fmt=checkpoints.SEGMENTER)


def test_split_file_round_trip_and_roles(tmp_path):
    ids = [f"c{i:02d}" for i in range(12)]
    split = make_split(ids[:10], seed=1, test_fraction=0.3, val_fraction=0.2, label_fraction=0.5)
    path = write_split(tmp_path / "split.json", split, dataset_name="D", case_ids=ids, seed=1, test_fraction=0.3,
                       val_fraction=0.2, label_fraction=0.5)
    back = read_split(path, dataset_name="D", case_ids=ids)
    assert back == {role: sorted(v) for role, v in split.items()}
    assert split_cases(path, "test") == sorted(split["test"])
    assert sorted(set(ids) - {c for v in back.values() for c in v}) == ["c10", "c11"]  # unlabelled: no training role
    with pytest.raises(InputDataError, match="not an ssl3d split.json"):
        (tmp_path / "bad.json").write_text("{}")
        read_split(tmp_path / "bad.json")


def test_rank_questions_before_the_process_group(monkeypatch):
    from ssl3d_cli.runtime.distributed import is_main_process, process_rank

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert process_rank() == 0 and is_main_process()
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert process_rank() == 3 and not is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "2")  # a one-task srun step is not distributed: rank 0
    assert process_rank() == 0
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("MASTER_ADDR", "node1")  # srun launching 4 tasks, before torch.distributed starts
    assert process_rank() == 2 and not is_main_process()
