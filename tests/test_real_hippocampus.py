"""Real MRI (MSD Task04 Hippocampus, a handful of cases): the chain trains and predicts on real scans.

Runs when ``../shared/data/Task04_Hippocampus`` sits next to the checkout or ``$SSL3D_HIPPOCAMPUS`` points to it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl3d_cli.config import FinetuneConfig, ModelConfig, PreprocessConfig, RuntimeConfig
from tests.conftest import REAL_DATA

HIPPOCAMPUS = Path(os.environ.get("SSL3D_HIPPOCAMPUS") or REAL_DATA.parent / "Task04_Hippocampus")
pytestmark = pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").exists(), reason=f"{HIPPOCAMPUS} not found")


@pytest.fixture(scope="module")
def hippocampus_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labelled + 2 unlabelled real cases in MSD layout (copied: the shared data is read-only)."""
    dst = tmp_path_factory.mktemp("real") / "Task04_Hippocampus"
    spec = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    spec["training"], spec["test"] = spec["training"][:12], spec["test"][:2]
    spec["numTraining"], spec["numTest"] = 12, 2
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dst / sub).mkdir(parents=True)
    for case in spec["training"]:
        shutil.copy(HIPPOCAMPUS / case["image"], dst / case["image"])
        shutil.copy(HIPPOCAMPUS / case["label"], dst / case["label"])
    for case in spec["test"]:
        path = case if isinstance(case, str) else case["image"]
        shutil.copy(HIPPOCAMPUS / path, dst / path)
    (dst / "dataset.json").write_text(json.dumps(spec))
    return dst


def test_real_mri_is_normalised_whatever_its_intensity_scale(hippocampus_subset):
    """uint8 and float32 scans with maxima from ~1e2 to ~1e6 all come out z-scored (MR: over the nonzero voxels)."""
    from ssl3d_cli.data.cache import Cache
    from ssl3d_cli.stages import preprocess

    cache = Cache(preprocess(hippocampus_subset, config=PreprocessConfig(size=(16, 16, 16))).cache_dir)
    assert cache.dataset.modality == "mr" and cache.dataset.class_names == ("background", "Anterior", "Posterior")
    for case_id in cache.case_ids:
        image = np.asarray(cache.image(case_id), dtype=np.float64)
        assert abs(image.mean()) < 0.25 and 0.6 < image.std() < 1.4, case_id


def test_real_mri_training_beats_an_untrained_network(hippocampus_subset, tmp_path):
    """A fixed small budget (8 scans, 20 epochs at 16^3, from scratch) reaches a test Dice far above an untrained U-Net's."""
    from ssl3d_cli.data.cache import Cache
    from ssl3d_cli.metrics import dice_per_class_indices
    from ssl3d_cli.models.unet import UNet
    from ssl3d_cli.stages import finetune

    model = ModelConfig(widths=(8, 16), dropout_encoder=0.3)
    config = FinetuneConfig(epochs=20, batch_size=2, workers=0, learning_rate=1e-2, warmup_epochs=1, from_scratch=True, model=model)
    runtime = RuntimeConfig(device="cpu", seed=0, threads=2, deterministic=True)
    result = finetune(hippocampus_subset, config=config, runtime=runtime, preprocess_config=PreprocessConfig(size=(16, 16, 16)),
                      output=tmp_path / "run")
    trained = result["test"]["mean"]["dice_mean_fg"]
    test_ids = json.loads((tmp_path / "run" / "split.json").read_text())["cases"]
    test_ids = sorted(c for c, role in test_ids.items() if role == "test")
    cache = Cache(Path(json.loads((tmp_path / "run" / "config.json").read_text())["cache"]))
    torch.manual_seed(0)
    untrained_net = UNet(model, 3).eval()
    with torch.no_grad():
        untrained = float(np.mean([np.mean(dice_per_class_indices(
            untrained_net(torch.from_numpy(np.array(cache.image(c), dtype=np.float32))[None]).argmax(1)[0].numpy(), cache.label(c), 3)[1:])
            for c in test_ids]))
    assert trained > 0.2 and trained > untrained + 0.15, (trained, untrained)
