"""The ssl3d chain through the Python API (``ssl3d_cli.stages``), on a small synthetic dataset.

    python examples/python_api.py [WORKDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl3d_cli.config import FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.stages import evaluate, finetune, predict, preprocess, pretrain, synth, uncertainty

work = Path(sys.argv[1] if len(sys.argv) > 1 else "ssl3d-api-example")
runtime = RuntimeConfig(device="auto", seed=0)
model = ModelConfig(widths=(8, 16, 32))

data = synth(work / "Task99_Synth", kind="ct", cases=16, unlabelled=4, shape=(48, 48, 24)).root
cache = preprocess(data, config=PreprocessConfig(size=(32, 32, 32))).cache_dir
enc = pretrain(cache, config=PretrainConfig(epochs=20, batch_size=4, patches_per_side=2, workers=0, model=model),
               runtime=runtime, output=work / "runs" / "pretrain")
ft = finetune(cache, encoder=Path(enc["encoder"]), runtime=runtime, output=work / "runs" / "finetune",
              config=FinetuneConfig(epochs=40, freeze_epochs=5, label_fraction=0.25, learning_rate=3e-3, workers=0, model=model))
print("test Dice (deterministic):", ft["test"]["mean"]["dice_mean_fg"])

mc = MCConfig(mc_samples=20, dropout_encoder=0.3, dropout_decoder=0.0, vote="weighted-probs", vote_weights=(1.0, 2.0, 2.0))
predict([data], split="test", output=work / "preds", model=Path(ft["model"]), mc=mc, runtime=runtime)
table = evaluate(work / "preds", data)
print("test Dice (MC dropout, weighted-probs):", table["mean"]["dice_mean_fg"])

maps = uncertainty([data / "imagesTs" / "synthct_016.nii.gz"], output=work / "uncertainty", model=Path(ft["model"]),
                   mc=MCConfig(mc_samples=20), classes=["organ"], runtime=runtime)
print("uncertainty maps:", maps["cases"][0]["files"])
