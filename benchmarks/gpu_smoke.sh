#!/usr/bin/env bash
# GPU smoke test (pretrain/finetune/predict/uncertainty with mixed precision) and the benchmarks' GPU figures.
# Usage: bash benchmarks/gpu_smoke.sh OUTDIR
# Env: DEVICE (cuda), SIZE (128), SHAPE ("128 128 64"), MC (100), WIDTHS (16,32,64,128,256) -- smaller values for a CPU dry run.
set -uo pipefail
OUT=${1:-gpu-out}
DEVICE=${DEVICE:-cuda}; SIZE=${SIZE:-128}; SHAPE=${SHAPE:-128 128 64}; MC=${MC:-100}; WIDTHS=${WIDTHS:-16,32,64,128,256}
mkdir -p "$OUT"
W=$(mktemp -d)
export SSL3D_CACHE_DIR=$W/cache SSL3D_RUNS_DIR=$W/runs PYTHONUNBUFFERED=1
S="python3 -m ssl3d_cli"
(nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi") >> "$OUT/log.txt"
t() {
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  echo "=== $name: $*" >> "$OUT/log.txt"
  if "$@" > "$W/stdout" 2>> "$OUT/log.txt"; then rc=0; else rc=$?; fi
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"ms\": $ms}" >> "$OUT/results.jsonl"
  tail -n 1 "$W/stdout" >> "$OUT/results.jsonl"
  echo "$name rc=$rc ${ms}ms"
}
t synth $S synth $W/Task99 --kind ct --cases 16 --unlabelled 4 --shape $SHAPE --json
t preprocess $S preprocess $W/Task99 --size $SIZE --workers 8 --json
t pretrain $S pretrain $W/Task99 --size $SIZE --widths $WIDTHS --epochs 3 --batch-size 4 --patches-per-side 2 --workers 4 --checkpoint-every 1 -o $W/runs/pre --json --device $DEVICE
t pretrain_resume $S pretrain $W/Task99 --size $SIZE --widths $WIDTHS --epochs 4 --batch-size 4 --patches-per-side 2 --workers 4 --checkpoint-every 1 -o $W/runs/pre --resume --json --device $DEVICE
t finetune $S finetune $W/Task99 --size $SIZE --widths $WIDTHS --encoder $W/runs/pre/encoder.pt --epochs 4 --freeze-epochs 2 --workers 4 -o $W/runs/ft --json --device $DEVICE
t predict $S predict $W/Task99 --split test --model $W/runs/ft/model.pt --mc-samples $MC --vote borda -o $W/preds --json --device $DEVICE
t evaluate $S evaluate $W/preds $W/Task99 --json
t uncertainty $S uncertainty $W/Task99/imagesTs/synthct_016.nii.gz --model $W/runs/ft/model.pt --mc-samples $MC --class organ -o $W/unc --json --device $DEVICE
cp $W/unc/*.png "$OUT/" 2>/dev/null
t bench_pretrain_b4k2 python3 benchmarks/pretrain.py --device $DEVICE --size $SIZE --widths $WIDTHS --patches-per-side 2 --batch-size 4 --steps 10
t bench_pretrain_b2k4 python3 benchmarks/pretrain.py --device $DEVICE --size $SIZE --widths $WIDTHS --patches-per-side 4 --batch-size 2 --steps 10
t bench_mc python3 benchmarks/mc_dropout.py --device $DEVICE --sizes 64,$SIZE --samples 1,10,$MC --widths $WIDTHS
t bench_predict_e2e python3 benchmarks/predict_e2e.py --device $DEVICE --cases 3 --mc-samples $MC --vote borda --widths $WIDTHS --size $SIZE
cat $W/runs/pre/metrics.jsonl $W/runs/ft/metrics.jsonl >> "$OUT/results.jsonl" 2>/dev/null
