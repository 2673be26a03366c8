#!/usr/bin/env bash
# One command, under 5 minutes on one GPU: the numbers issue 12 asks for, taken whenever a GPU is available.
#   1. host-device syncs of a real run, per kind of step (cuda_sync_check.py; fails if an ordinary step syncs)
#   2. ResNet-50 (ImageNet shapes, batch 256): dense vs RigL+SparseOpt, fp32 vs bf16+channels_last, eager
#   3. ResNet-20 (CIFAR shapes, batch 128): dense vs RigL+SparseOpt, bf16, eager vs compiled
#   4. the input pipeline: JPEG decode per worker, batches pinned/normalised on the device, CIFAR augmentation
#   5. verdicts: ResNet-50 sparse/dense >= 0.97 and bf16/fp32 >= 2 (issue 12)
# Usage: bash benchmarks/gpu_check.sh [PYTHON]   (default: .venv/bin/python, else python)
# Results: benchmarks/results/{train_throughput_r50,train_throughput_r20,input_pipeline}.json and this output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "=== $1"; shift; local t0=$SECONDS; timeout "$@"; local rc=$?; echo "=== exit $rc after $((SECONDS - t0)) s"; [ $rc -eq 0 ] || status=1; return $rc; }

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no GPU: stop"; exit 1; }

step "1. host-device syncs per kind of step" 45 "$PY" benchmarks/cuda_sync_check.py --steps 120
step "2. ResNet-50 throughput" 90 "$PY" benchmarks/bench_train_throughput.py --models resnet50 --compile "" \
    --reps 5 --steps 10 --warmup 5 && cp benchmarks/results/train_throughput.json benchmarks/results/train_throughput_r50.json
step "3. ResNet-20 throughput, eager vs compiled" 120 "$PY" benchmarks/bench_train_throughput.py --models resnet20 \
    --precisions bf16 --compile resnet20 --reps 5 --steps 20 --warmup 5 \
    && cp benchmarks/results/train_throughput.json benchmarks/results/train_throughput_r20.json
step "4. input pipeline" 45 "$PY" benchmarks/bench_input_pipeline.py --images 512 --workers 1,4,8 --epochs 2 --reps 5

echo; echo "=== 5. verdicts (issue 12: ResNet-50 sparse/dense >= 0.97, bf16/fp32 >= 2)"
"$PY" - <<'EOF' || status=1
import json, sys
r = json.load(open("benchmarks/results/train_throughput_r50.json"))["results"]["resnet50"]["paired_ratios"]
checks = [("sparse/dense fp32 eager", 0.97), ("sparse/dense bf16 eager", 0.97),
          ("bf16/fp32 dense eager", 2.0), ("bf16/fp32 rigl+so eager", 2.0)]
ok = True
for name, goal in checks:
    verdict = "PASS" if r[name] >= goal else "FAIL"
    ok &= verdict == "PASS"
    print(f"  {name:<26} {r[name]:6.3f}  (goal >= {goal})  {verdict}")
sys.exit(0 if ok else 1)
EOF
echo; echo "gpu_check: $([ $status -eq 0 ] && echo 'all passed' || echo 'SOMETHING FAILED (see above)')"
exit $status
