"""The ssl3d chain through the Python API (``ssl3d_cli.stages``), on a small synthetic dataset.

    python examples/python_api.py [WORKDIR] [--tiny]

``--tiny`` shrinks every size so the whole chain runs in seconds (the test suite runs it that way,
so this documented API cannot silently break).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl3d_cli.config import FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.stages import evaluate, finetune, predict, preprocess, pretrain, synth, uncertainty

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("workdir", nargs="?", default="ssl3d-api-example", type=Path)
parser.add_argument("--tiny", action="store_true", help="tiny sizes: the whole chain in seconds on a CPU")
args = parser.parse_args()

work: Path = args.workdir
shape, size, widths = ((24, 24, 16), 16, (4, 8)) if args.tiny else ((48, 48, 24), 32, (8, 16, 32))
pretrain_epochs, finetune_epochs, freeze_epochs, mc_samples = (2, 3, 1, 3) if args.tiny else (20, 40, 5, 20)
runtime = RuntimeConfig(device="auto", seed=0)
model = ModelConfig(widths=widths)  # pretraining: no dropout
segmenter = ModelConfig(widths=widths, dropout_encoder=0.3, dropout_decoder=0.0)  # trained with the dropout MC dropout samples with

data = synth(work / "Task99_Synth", kind="ct", cases=16, unlabelled=4, shape=shape).root
cache = preprocess(data, config=PreprocessConfig(size=(size,) * 3)).cache_dir
enc = pretrain(cache, config=PretrainConfig(epochs=pretrain_epochs, batch_size=4, patches_per_side=2, workers=0, model=model),
               runtime=runtime, output=work / "runs" / "pretrain")
ft = finetune(cache, encoder=Path(enc["encoder"]), runtime=runtime, output=work / "runs" / "finetune",
              config=FinetuneConfig(epochs=finetune_epochs, freeze_epochs=freeze_epochs, label_fraction=0.25, learning_rate=3e-3, workers=0,
                                    model=segmenter))
print("test Dice (deterministic):", ft["test"]["mean"]["dice_mean_fg"])

# dropout rates default to the model's training rates (encoder 0.3, decoder 0.0)
mc = MCConfig(mc_samples=mc_samples, vote="weighted-probs", vote_weights=(1.0, 2.0, 2.0))
predict([data], split="test", output=work / "preds", model=Path(ft["model"]), mc=mc, runtime=runtime)
table = evaluate(work / "preds", data)
print("test Dice (MC dropout, weighted-probs):", table["mean"]["dice_mean_fg"])

maps = uncertainty([data / "imagesTs" / "synthct_016.nii.gz"], output=work / "uncertainty", model=Path(ft["model"]),
                   mc=MCConfig(mc_samples=max(mc_samples, 2)), classes=["organ"], runtime=runtime)
print("uncertainty maps:", maps["cases"][0]["files"])
