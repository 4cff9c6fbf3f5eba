"""``ssl3d demo``: the whole chain on built-in synthetic CT-like data, on a CPU, in minutes.

synth -> preprocess -> SimCLR pretraining -> fine-tuning from the encoder and from scratch at a low
label fraction -> deterministic and MC-dropout prediction of the test cases -> evaluation ->
uncertainty maps and the figure for one test case.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl3d_cli.config import FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.data.splits import SPLIT_FILE, split_cases
from ssl3d_cli.errors import InputDataError

log = logging.getLogger("ssl3d")


@dataclass(frozen=True)
class DemoPreset:
    cases: int
    unlabelled: int
    shape: tuple[int, int, int]
    size: int
    widths: tuple[int, ...]
    patches_per_side: int
    pretrain_epochs: int
    finetune_epochs: int
    freeze_epochs: int
    label_fraction: float
    mc_samples: int


#: Weighted soft Dice for the demo's CT-like classes (background, organ, lesion).
DEMO_CLASS_WEIGHTS = (1.0, 1.0, 2.0)

PRESETS = {
    "tiny": DemoPreset(8, 2, (24, 24, 16), 16, (4, 8), 1, 2, 3, 1, 0.5, 3),
    "default": DemoPreset(16, 6, (48, 48, 24), 32, (8, 16, 32), 2, 30, 90, 5, 0.25, 20),
    "full": DemoPreset(40, 20, (128, 128, 64), 128, (16, 32, 64, 128, 256), 4, 200, 200, 25, 0.25, 100),
}


def demo(output: Path | str, *, preset: str = "default", device: str = "auto", seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """Run the demo chain into ``output``; returns the comparison table and every artefact's path."""
    from ssl3d_cli.stages.evaluate import evaluate
    from ssl3d_cli.stages.finetune import finetune
    from ssl3d_cli.stages.predict import predict
    from ssl3d_cli.stages.preprocess import preprocess
    from ssl3d_cli.stages.pretrain import pretrain
    from ssl3d_cli.stages.synth import synth
    from ssl3d_cli.stages.uncertainty import uncertainty

    p = PRESETS[preset]
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise InputDataError(f"{out}: demo folder exists and is not empty; choose another with -o or remove it")
    t0 = time.perf_counter()
    runtime = RuntimeConfig(device=device, seed=seed, threads=threads)
    data = out / "Task99_SynthCT"
    log.info("[1/7] Synthesising a CT-like dataset (%d labelled + %d unlabelled cases)", p.cases, p.unlabelled)
    synth(data, kind="ct", cases=p.cases, unlabelled=p.unlabelled, seed=seed, shape=p.shape)
    log.info("[2/7] Preprocessing to %d^3", p.size)
    cache = preprocess(data, config=PreprocessConfig(size=(p.size,) * 3), cache_dir=out / "cache").cache_dir
    model = ModelConfig(widths=p.widths)
    log.info("[3/7] SimCLR pretraining (%d epochs)", p.pretrain_epochs)
    pre = pretrain(cache, config=PretrainConfig(epochs=p.pretrain_epochs, batch_size=4, patches_per_side=p.patches_per_side,
                                                warmup_epochs=max(1, p.pretrain_epochs // 10), checkpoint_every=max(1, p.pretrain_epochs),
                                                workers=0, model=model, temperature=0.1), runtime=runtime, output=out / "runs" / "pretrain")
    # fine-tuning trains with the encoder dropout that MC prediction samples with (the paper's 0.3/0.0); pretraining has none
    ft_model = ModelConfig(widths=p.widths, dropout_encoder=0.3, dropout_decoder=0.0)
    # weighted soft Dice (paper Eq. 2, --class-weights): the lesion counts twice, so that three labelled scans and a
    # minute of training do not settle on never predicting it (background 1, organ 1, lesion 2)
    ft_common = dict(epochs=p.finetune_epochs, freeze_epochs=p.freeze_epochs, label_fraction=p.label_fraction, batch_size=2,
                     workers=0, learning_rate=3e-3, warmup_epochs=2, val_fraction=0.2, checkpoint_every=p.finetune_epochs,
                     class_weights=DEMO_CLASS_WEIGHTS)
    log.info("[4/7] Fine-tuning from the SimCLR encoder at label fraction %g", p.label_fraction)
    ssl = finetune(cache, encoder=Path(pre["encoder"]), config=FinetuneConfig(model=ft_model, **ft_common), runtime=runtime,
                   output=out / "runs" / "finetune-simclr", evaluate_test=False)
    log.info("[5/7] Fine-tuning from scratch (the baseline) on the same split")
    base = finetune(cache, config=FinetuneConfig(model=ft_model, from_scratch=True, **ft_common), runtime=runtime,
                    output=out / "runs" / "finetune-scratch", evaluate_test=False, split_file=out / "runs" / "finetune-simclr" / SPLIT_FILE)
    log.info("[6/7] Predicting the test cases: deterministic and %d MC-dropout samples (majority vote)", p.mc_samples)
    test_ids = split_cases(out / "runs" / "finetune-simclr" / SPLIT_FILE, "test")
    rows = []
    for name, run in (("SimCLR", ssl), ("scratch", base)):
        for label, mc in (("deterministic", MCConfig(mc_samples=0)), (f"MC x{p.mc_samples}", MCConfig(mc_samples=p.mc_samples, seed=seed))):
            pred_dir = out / "predictions" / f"{name.lower()}-{'mc' if mc.stochastic else 'det'}"
            predict([data], split="test", output=pred_dir, model=Path(run["model"]), mc=mc, runtime=runtime)
            table = evaluate(pred_dir, data, with_hd95=False, case_ids=test_ids)
            rows.append({"init": name, "inference": label, **{k: v for k, v in table["mean"].items() if k.startswith("dice")},
                         "predictions": str(pred_dir)})
    first_test = test_ids[0]
    log.info("[7/7] Uncertainty maps for %s", first_test)
    unc = uncertainty([data / "imagesTr" / f"{first_test}.nii.gz"], output=out / "uncertainty", model=Path(ssl["model"]),
                      mc=MCConfig(mc_samples=max(p.mc_samples, 2), seed=seed), runtime=runtime, classes=["organ"],
                      label=data / "labelsTr" / f"{first_test}.nii.gz")
    return {
        "output": str(out), "preset": preset, "seconds": round(time.perf_counter() - t0, 1), "dataset": str(data), "cache": str(cache),
        "encoder": pre["encoder"], "model_simclr": ssl["model"], "model_scratch": base["model"], "label_fraction": p.label_fraction,
        "train_cases": ssl["train_cases"], "test_cases": ssl["test_cases"], "table": rows,
        "figure": unc["cases"][0].get("figure"), "uncertainty": unc["output"],
    }
