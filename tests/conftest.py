"""Shared fixtures: tiny synthetic datasets, real scans copied into a temporary folder, NIfTI helpers."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# ../shared/data/real next to the checkout (read-only), or wherever $SSL3D_REAL_DATA points
REAL_DATA = Path(os.environ.get("SSL3D_REAL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real")


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI with a non-trivial affine by default (anisotropic spacing, an LPS flip)."""
    if affine is None:
        affine = np.diag([-1.5, -0.8, 2.5, 1.0])
        affine[:3, 3] = [40.0, 20.0, -30.0]
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep caches and runs out of the user's folders."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("SSL3D_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("SSL3D_RUNS_DIR", str(base / "runs"))


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CT-like MSD dataset (8 labelled + 2 unlabelled cases, ~32x32x16)."""
    from ssl3d_cli.stages.synth import synth

    root = tmp_path_factory.mktemp("data") / "Task99_SynthCT"
    synth(root, kind="ct", cases=8, unlabelled=2, seed=1, shape=(32, 32, 16))
    return root


@pytest.fixture(scope="session")
def mr_brats_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BraTS-2018-named dataset (3 labelled + 1 unlabelled cases)."""
    from ssl3d_cli.stages.synth import synth

    root = tmp_path_factory.mktemp("data") / "BraTS18"
    synth(root, kind="mr", cases=3, unlabelled=1, seed=2, shape=(24, 24, 20), layout="brats")
    return root


@pytest.fixture(scope="session")
def ct_cache(ct_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ct_dataset`` preprocessed to 16^3."""
    from ssl3d_cli.config import PreprocessConfig
    from ssl3d_cli.stages.preprocess import preprocess

    out = tmp_path_factory.mktemp("cache") / "ct16"
    preprocess(ct_dataset, config=PreprocessConfig(size=(16, 16, 16)), cache_dir=out)
    return out


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    """The real scans copied into a temporary folder (the shared folder is read-only)."""
    if not REAL_DATA.exists():
        pytest.skip(f"real scans not found at {REAL_DATA}")
    out = tmp_path / "real"
    shutil.copytree(REAL_DATA, out)
    return out


@pytest.fixture(scope="session")
def model_path(ct_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model fine-tuned on ``ct_cache`` (Task99_SynthCT) for 3 epochs, trained with encoder dropout 0.3 (as it is sampled)."""
    from ssl3d_cli.config import FinetuneConfig, ModelConfig, RuntimeConfig
    from ssl3d_cli.stages.finetune import finetune

    out = tmp_path_factory.mktemp("seg") / "finetune-run"
    finetune(ct_cache, config=FinetuneConfig(epochs=3, from_scratch=True, batch_size=2, workers=0, model=ModelConfig(widths=(4, 8), dropout_encoder=0.3),
                                             warmup_epochs=0, learning_rate=1e-2),
             runtime=RuntimeConfig(device="cpu"), output=out, evaluate_test=False)
    return out / "model.pt"


class Interrupts:
    """The two ways the resume tests cut a pretraining run short: a crash ("SIGKILL") right after an epoch's metrics
    line is written, and SIGTERM during a given step (the n-th SimCLR loss of the run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    @contextmanager
    def crash_after_logging_epoch(self, epoch: int) -> Iterator[None]:
        run_module = importlib.import_module("ssl3d_cli.training.run")
        real = run_module.append_metrics

        def crash(path, record):  # noqa: ANN001, ANN202
            real(path, record)
            if record["epoch"] == epoch:
                raise KeyboardInterrupt

        self.monkeypatch.setattr(run_module, "append_metrics", crash)
        try:
            yield
        finally:
            self.monkeypatch.setattr(run_module, "append_metrics", real)

    @contextmanager
    def sigterm_at_step(self, n: int) -> Iterator[None]:
        stage = importlib.import_module("ssl3d_cli.stages.pretrain")
        real = stage.simclr_loss
        calls = {"n": 0}

        def signalling(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **kw)

        self.monkeypatch.setattr(stage, "simclr_loss", signalling)
        try:
            yield
        finally:
            self.monkeypatch.setattr(stage, "simclr_loss", real)


@pytest.fixture
def interrupts(monkeypatch: pytest.MonkeyPatch) -> Interrupts:
    """:class:`Interrupts` for this test."""
    return Interrupts(monkeypatch)
