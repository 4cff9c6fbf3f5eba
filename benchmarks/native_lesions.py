"""Small lesions at the fixed grid vs native resolution, with trained models (issue 15's evidence, the trained half).

    python benchmarks/native_lesions.py [--cases 10] [--epochs 40] [--fixed-size 40] [--patch 64,64,16]
                                        [--widths 8,16,32] [--radius-mm 1.5] [--loss dice] [--lesion-weight 2]
                                        [--validate-every 1] [--threads 1] [--out DIR]

Writes an MSD-style dataset of CT-like scans at 0.8 x 0.8 x 2.5 mm with six lesions of ``--radius-mm`` each
(``data.synthetic.make_small_lesion_ct``), then fine-tunes two U-Nets from scratch with the same epochs, loss, class
weights 1/1/``--lesion-weight`` and seed: one on the fixed ``--fixed-size`` grid (this scan size's analogue of 128^3 for a 512-wide CT),
one at native resolution on ``--patch`` patches; each run's held-out test scans are predicted as ``ssl3d predict``
would (the fixed model whole, the native one by sliding window) and scored on the scans' own grids. Prints one JSON
line with both test tables (lesion and organ Dice, HD95) and the seconds each took. CPU-sized by default (minutes).
``tests/test_native_lesions.py`` has the training-free half: what each grid can represent at all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def write_dataset(root: Path, cases: int, radius_mm: float) -> None:
    """``root``/imagesTr + labelsTr + dataset.json of ``cases`` small-lesion CTs (seeds 0..cases-1)."""
    import nibabel as nib
    import numpy as np

    from ssl3d_cli.data.synthetic import make_small_lesion_ct

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        case = make_small_lesion_ct(np.random.default_rng(i), radius_mm=radius_mm)
        name = f"lesion_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(case.image, case.affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(case.label, case.affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": cases, "training": training, "test": []}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--fixed-size", type=int, default=40)
    ap.add_argument("--patch", default="64,64,16")
    ap.add_argument("--widths", default="8,16,32")
    ap.add_argument("--radius-mm", type=float, default=1.5)
    ap.add_argument("--loss", default="dice", help="dice | dice-ce (both modes)")
    ap.add_argument("--lesion-weight", type=float, default=2.0, help="class weight of the lesion (background and organ 1)")
    ap.add_argument("--validate-every", type=int, default=1, help="epochs between selection-scan validations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="keep the dataset, caches and runs here (default: a temporary folder)")
    args = ap.parse_args()

    from ssl3d_cli.config import FinetuneConfig, ModelConfig, PreprocessConfig, RuntimeConfig
    from ssl3d_cli.stages.finetune import finetune
    from ssl3d_cli.stages.preprocess import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        data = work / "Task97_SmallLesions"
        if not data.exists():
            write_dataset(data, args.cases, args.radius_mm)
        runtime = RuntimeConfig(device=args.device, threads=args.threads, seed=0)
        model = ModelConfig(widths=tuple(int(w) for w in args.widths.split(",")), dropout_encoder=0.3)
        common = dict(epochs=args.epochs, from_scratch=True, batch_size=2, workers=0, class_weights=(1.0, 1.0, args.lesion_weight),
                      warmup_epochs=2, learning_rate=3e-3, val_fraction=0.2, checkpoint_every=args.epochs, model=model, loss=args.loss,
                      validate_every=args.validate_every)
        out: dict = {"benchmark": "native_lesions", "cases": args.cases, "epochs": args.epochs, "radius_mm": args.radius_mm,
                     "loss": args.loss, "lesion_weight": args.lesion_weight,
                     "widths": args.widths, "device": args.device, "threads": args.threads}
        modes = {"fixed": (PreprocessConfig(size=(args.fixed_size,) * 3), FinetuneConfig(**common)),
                 "native": (PreprocessConfig(spacing="auto"), FinetuneConfig(**common, patch_size=tuple(int(p) for p in args.patch.split(","))))}
        for name, (pre, config) in modes.items():
            t0 = time.perf_counter()
            cache = preprocess(data, config=pre, cache_root=work / "cache").cache_dir
            result = finetune(cache, config=config, runtime=runtime, output=work / f"run-{name}")
            mean = result["test"]["mean"]
            out[name] = {"seconds": round(time.perf_counter() - t0, 1), "test_cases": result["test"]["cases"],
                         **{k: round(v, 4) for k, v in mean.items() if k.startswith(("dice_", "hd95_"))}}
            if name == "fixed":
                out[name]["grid"] = args.fixed_size
            else:
                out[name]["patch"] = args.patch
            print(json.dumps({name: out[name]}), flush=True)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
