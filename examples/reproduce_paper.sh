#!/usr/bin/env bash
# The paper's settings on Task07_Pancreas (MSD) and BraTS 2018, on one GPU.
#
# Data: Task07_Pancreas.tar from http://medicaldecathlon.com (420 scans, 281 labelled);
#       BraTS 2018 from https://www.med.upenn.edu/sbia/brats2018/data.html (HGG/ and LGG/ case folders).
# Time (estimates from the H100 benchmark in benchmarks/, bf16): SimCLR 1000 epochs with K=4 (64 patches of 32^3
# per scan, 4 scans per step) on 420 scans ~ 420/4 x 1000 steps x ~0.1 s ~ 3 h; each fine-tuning run 400 epochs
# x ~100 steps x ~0.05 s ~ 35 min; the label-fraction experiment = 10 runs ~ 6 h per repetition.
set -euo pipefail
PANCREAS=${PANCREAS:-$HOME/data/Task07_Pancreas}
BRATS=${BRATS:-$HOME/data/MICCAI_BraTS_2018_Data_Training}

for DATA in "$PANCREAS" "$BRATS"; do
  NAME=$(basename "$DATA")
  ssl3d preprocess "$DATA" --size 128 --workers 8 --verify
  ssl3d pretrain "$DATA" --epochs 1000 --patches-per-side 4 --batch-size 4 --temperature 0.05 -o "runs/pretrain-$NAME"
  # Figures 1-2: SimCLR vs from scratch over 5..100 % labels (400 epochs, 25 frozen), 3 seeds
  ssl3d experiment label-fractions "$DATA" --encoder "runs/pretrain-$NAME/encoder.pt" --repetitions 3 -o "experiments/$NAME"
  # Figures 3-6: MC dropout (100 samples; encoder 0.3 / decoder 0.0 is the paper's best), sites, rates, vote rules
  ssl3d experiment mc-dropout "$DATA" --encoder "runs/pretrain-$NAME/encoder.pt" --repetitions 3 -o "experiments/$NAME"
done
# Figure 7: percentile heat maps of the whole tumour for one BraTS case
CASE=$(find "$BRATS" -maxdepth 2 -type d -name 'Brats18_*' | head -n1)
ssl3d uncertainty "$CASE" --model "$(ls -t experiments/*/runs/simclr-f1-s0/model.pt | head -n1)" --mc-samples 100 --class WT \
  --label "$(ls "$CASE"/*_seg.nii.gz)" -o figure7
