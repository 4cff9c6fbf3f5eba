#!/usr/bin/env bash
# The five steps on a synthetic pancreas-like dataset, sized for a CPU (a few minutes).
set -euo pipefail
WORK=${1:-ssl3d-quickstart}
mkdir -p "$WORK" && cd "$WORK"
ssl3d synth ./Task99_Synth --kind ct --cases 16 --unlabelled 4 --shape 48 48 24
ssl3d preprocess ./Task99_Synth --size 32
ssl3d pretrain ./Task99_Synth --size 32 --widths 8,16,32 --epochs 20 --workers 0 -o runs/pretrain
ssl3d finetune ./Task99_Synth --size 32 --widths 8,16,32 --encoder runs/pretrain/encoder.pt --label-fraction 0.25 \
  --epochs 40 --freeze-epochs 5 --lr 3e-3 --workers 0 -o runs/finetune
ssl3d predict ./Task99_Synth --split test --model runs/finetune/model.pt --mc-samples 20 --vote borda -o preds
ssl3d evaluate preds ./Task99_Synth
ssl3d uncertainty ./Task99_Synth/imagesTs/synthct_016.nii.gz --model runs/finetune/model.pt --mc-samples 20 --class organ -o uncertainty
