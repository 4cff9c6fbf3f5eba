#!/usr/bin/env bash
# GPU figures of issue 14 and a smoke test of the whole chain (pretrain/finetune/predict/uncertainty, mixed precision,
# torch.compile) in one call, most important first, each step under its own time limit so one slow step cannot lose
# the others' figures.
# Usage: bash benchmarks/gpu_smoke.sh OUTDIR
# Env: DEVICE (cuda), SIZE (128), SHAPE ("128 128 64"), MC (100), WIDTHS (16,32,64,128,256), CT_SHAPE (512,512,96),
#      E2E_CASES (6), BUDGET (seconds for the whole script, 560: a step that would pass it is cut or skipped; each step also
#      has its own limit below), SKIP ("" or names of steps to skip, e.g. "bench_mc predict"), MC_MODES (mc_dropout.py's
#      --modes), E2E_PREFETCH (predict_e2e.py's --prefetch list, 1,2), PRETRAIN_MODES (pretrain.py's --compile list),
#      PRETRAIN_STEPS (its --steps, 50).
# A CPU dry run: DEVICE=cpu SIZE=32 SHAPE="32 32 16" MC=4 WIDTHS=4,8 CT_SHAPE=96,96,32 E2E_CASES=2 bash benchmarks/gpu_smoke.sh /tmp/o
set -uo pipefail
OUT=${1:-gpu-out}
DEVICE=${DEVICE:-cuda}; SIZE=${SIZE:-128}; SHAPE=${SHAPE:-128 128 64}; MC=${MC:-100}; WIDTHS=${WIDTHS:-16,32,64,128,256}
CT_SHAPE=${CT_SHAPE:-512,512,96}; E2E_CASES=${E2E_CASES:-6}; BUDGET=${BUDGET:-560}; SKIP=${SKIP:-}
END=$(( $(date +%s) + BUDGET ))
mkdir -p "$OUT"
W=$(mktemp -d)
REPO=$(cd "$(dirname "$0")/.." && pwd)
# the benchmarks import ssl3d_cli from the checkout, installed or not
export SSL3D_CACHE_DIR=$W/cache SSL3D_RUNS_DIR=$W/runs PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
S="python3 -m ssl3d_cli"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi") >> "$OUT/log.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cores', __import__('os').cpu_count())" >> "$OUT/log.txt"
SUMMARY=()
t() {  # t NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of BUDGET); rc 124 = cut at its limit
  local name=$1 limit=$2; shift 2
  case " $SKIP " in *" $name "*) echo "$name skipped"; return;; esac
  local left=$(( END - $(date +%s) ))
  if (( left < 15 )); then SUMMARY+=("$name not run (budget spent)"); return; fi
  (( limit > left )) && limit=$left
  local t0; t0=$(date +%s%N)
  echo "=== $name: $*" >> "$OUT/log.txt"
  if timeout "$limit" "$@" > "$W/stdout" 2>> "$OUT/log.txt"; then rc=0; else rc=$?; fi
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"ms\": $ms}" >> "$OUT/results.jsonl"
  { echo "=== $name"; cat "$W/stdout"; } >> "$OUT/steps.out"
  tail -n 1 "$W/stdout" >> "$OUT/results.jsonl"
  SUMMARY+=("$name rc=$rc ${ms}ms")
  echo "$name rc=$rc ${ms}ms"
}
# goal 3: where a view's GPU time goes (each transform, eager and compiled, dynamo's graph count)
t bench_augment 90 python3 benchmarks/augment.py --parts --device $DEVICE --n 32 --size $(( SIZE / 2 )) --repeats 10
# goal 3: pretraining through the real loop (DataLoader workers, prefetch to the device), augmentation compiled or not,
# views made a step ahead on the copy stream or (-inline) inside the step
t bench_pretrain 200 python3 benchmarks/pretrain.py --device $DEVICE --size $SIZE --widths $WIDTHS --patches-per-side 2 --batch-size 4 \
  --steps ${PRETRAIN_STEPS:-50} --compile ${PRETRAIN_MODES:-auto,off,off-inline} --profile auto
# the tests that only run on CUDA (sync-free augmentation and steps, device prefetch, compiled sampler = eager masks)
t cuda_tests 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_pretrain_pipeline.py tests/test_augment.py \
  tests/test_augment_compile.py tests/test_mc_compile.py
# issue 14 goal 2: MC sampling at SIZE^3, N = MC, against the hand-written batched loop (eager and compiled), same run
t bench_mc 130 python3 benchmarks/mc_dropout.py --device $DEVICE --sizes $SIZE --samples $MC --widths $WIDTHS --vote borda \
  --modes ${MC_MODES:-ssl3d,ssl3d-compiled,batched,batched-compiled} --repeats 3
# goal 1: predict end to end on CT-sized scans (sequential, then pipelined with 2 readers)
t bench_predict_e2e 110 python3 benchmarks/predict_e2e.py --device $DEVICE --cases $E2E_CASES --shape $CT_SHAPE --mc-samples $MC \
  --vote borda --widths $WIDTHS --size $SIZE --modes now --prefetch ${E2E_PREFETCH:-1,2}
# the chain, on the device
t synth 30 $S synth $W/Task99 --kind ct --cases 16 --unlabelled 4 --shape $SHAPE --json
t preprocess 40 $S preprocess $W/Task99 --size $SIZE --workers 8 --json
t pretrain 60 $S pretrain $W/Task99 --size $SIZE --widths $WIDTHS --epochs 3 --batch-size 4 --patches-per-side 2 --workers 4 --checkpoint-every 1 -o $W/runs/pre --json --device $DEVICE
t pretrain_resume 40 $S pretrain $W/Task99 --size $SIZE --widths $WIDTHS --epochs 4 --batch-size 4 --patches-per-side 2 --workers 4 --checkpoint-every 1 -o $W/runs/pre --resume --json --device $DEVICE
t finetune 60 $S finetune $W/Task99 --size $SIZE --widths $WIDTHS --encoder $W/runs/pre/encoder.pt --epochs 4 --freeze-epochs 2 --workers 4 -o $W/runs/ft --json --device $DEVICE
t predict 90 $S predict $W/Task99 --split test --model $W/runs/ft/model.pt --mc-samples $MC --vote borda --prefetch 2 -o $W/preds --json --device $DEVICE
t predict_eager 60 $S predict $W/Task99 --split test --model $W/runs/ft/model.pt --mc-samples $MC --vote borda --compile off -o $W/preds_eager --json --device $DEVICE
t compare_compiled 20 python3 -c "
import sys, json, numpy as np, nibabel as nib
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
rows = {p.name: int((np.asarray(nib.load(p).dataobj) != np.asarray(nib.load(b / p.name).dataobj)).sum()) for p in sorted(a.glob('*.nii.gz'))}
print(json.dumps({'differing_voxels_compiled_vs_eager': rows, 'voxels_per_case': int(np.prod(nib.load(next(a.glob('*.nii.gz'))).shape))}))
" $W/preds $W/preds_eager
t evaluate 30 $S evaluate $W/preds $W/Task99 --json
t uncertainty 60 $S uncertainty $W/Task99/imagesTs/synthct_016.nii.gz --model $W/runs/ft/model.pt --mc-samples $MC --class organ -o $W/unc --json --device $DEVICE
cp "$(ls $W/unc/*.png 2>/dev/null | head -n 1)" "$OUT/" 2>/dev/null  # one figure (what comes back is limited to a few files)
cat $W/runs/pre/metrics.jsonl $W/runs/ft/metrics.jsonl >> "$OUT/results.jsonl" 2>/dev/null
echo "--- summary"; printf '%s\n' "${SUMMARY[@]}"
