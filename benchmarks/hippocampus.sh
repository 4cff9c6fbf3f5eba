#!/usr/bin/env bash
# The paper's experiments on real MRI: MSD Task04 Hippocampus (100 labelled + 61 unlabelled T1 crops, ~35x50x36 at 1 mm).
# Usage: bash benchmarks/hippocampus.sh [DATA] [OUT] [REPETITIONS]
#   DATA: the Task04_Hippocampus folder (default ../shared/data/Task04_Hippocampus; copied, never modified)
#   OUT:  the experiment folder (default hippocampus-experiments); rerun the same command to resume
# Settings: `--quick` (32^3, U-Net widths 8,16,32, SimCLR 20 epochs with 2^3 patches of 16^3 per scan, fine-tuning 30 epochs
# with the encoder frozen for 5, 10 MC samples), label fractions 5/10/25/50/100 % of the 70-scan pool (30 test scans fixed);
# MC dropout at 25 % (Figures 3-6: 5 more SimCLR fine-tunings per seed); then the seeded ablations of
# benchmarks/hippocampus_ablation.py at 25 %, ranked by the selection Dice inside the label budget (never the test split).
# 32^3 is a mild down-sampling of these crops (50 -> 32 along A); the paper's 128^3 would up-sample them about 3x.
set -euo pipefail
DATA=${1:-$(dirname "$0")/../../shared/data/Task04_Hippocampus}
OUT=${2:-hippocampus-experiments}
REPS=${3:-3}
mkdir -p "$OUT"
if [ ! -d "$OUT/Task04_Hippocampus" ]; then cp -r "$DATA" "$OUT/Task04_Hippocampus"; fi
export SSL3D_CACHE_DIR=${SSL3D_CACHE_DIR:-$OUT/cache}
S="python -m ssl3d_cli"
/usr/bin/time -v $S experiment label-fractions "$OUT/Task04_Hippocampus" --quick --repetitions "$REPS" -o "$OUT" --device cpu --json \
  2> "$OUT/label-fractions.log" | tail -n 1 > "$OUT/label-fractions.json"
/usr/bin/time -v $S experiment mc-dropout "$OUT/Task04_Hippocampus" --quick --repetitions "$REPS" --fractions 0.25 -o "$OUT" --device cpu \
  --json 2> "$OUT/mc-dropout.log" | tail -n 1 > "$OUT/mc-dropout.json"
python "$(dirname "$0")/hippocampus_ablation.py" "$OUT" --seeds "$(seq -s, 0 $((REPS - 1)))" > "$OUT/ablation.md"
# the ablations' winner (100 fine-tuning epochs, chosen by selection Dice inside the budget) on the test split, once,
# with the same encoder, at the low label fractions the paper's claim is about
/usr/bin/time -v $S experiment label-fractions "$OUT/Task04_Hippocampus" --quick --finetune-epochs 100 --encoder "$OUT/pretrain/encoder.pt" \
  --repetitions "$REPS" --fractions 0.05,0.1,0.25 -o "$OUT/ft100" --device cpu --json 2> "$OUT/ft100.log" | tail -n 1 > "$OUT/ft100.json"
python "$(dirname "$0")/hippocampus_report.py" "$OUT" > "$OUT/report.md"
python "$(dirname "$0")/hippocampus_report.py" "$OUT/ft100" >> "$OUT/report.md"
echo "results: $OUT/report.md ($OUT/label-fractions, $OUT/mc-dropout, $OUT/ft100: results.csv, summary.json, plots)"
