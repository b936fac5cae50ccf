#!/usr/bin/env bash
# The benchmarks' GPU figures in one run (a CUDA machine; no FAISS or PyAV needed):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# decoding paths (nvjpeg vs PIL workers), ViT-S/16 beside ResNet-50 extraction (fp32 vs bf16), and the
# logistic-regression path at the real size (50k x 2048 x 100 classes) against scikit-learn on the
# machine's CPU cores. Each step has its own time limit, so one slow step cannot cost the others' figures.
set -u
OUT_DIR=${1:-benchmarks/out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== decode"; timeout 120 $PY -m benchmarks.bench_decode --images ${DECODE_IMAGES:-2048} --workers 8 --batch 128 \
    --rounds 2 --threads 4
echo "== extraction"; timeout 150 $PY -m benchmarks.bench_extraction --sections vit --device cuda --vit-batch 256 \
    --vit-batches 8 --rounds 3
echo "== logreg"; timeout ${LOGREG_TIMEOUT:-300} $PY -m benchmarks.bench_logreg --real --device cuda \
    --sk-every ${SK_EVERY:-9}
cp benchmarks/out/bench_decode.json benchmarks/out/extraction.json benchmarks/out/bench_logreg*.json "$OUT_DIR"/ \
    2>/dev/null || true
