#!/usr/bin/env bash
# The benchmarks' GPU figures in one run (a CUDA machine; no FAISS or PyAV needed):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# decoding paths (nvjpeg vs PIL workers), ViT-S/16 beside ResNet-50 extraction (fp32 vs bf16), and the
# logistic-regression path at the real size (50k x 2048 x 100 classes) against scikit-learn on the
# machine's CPU cores, first on every 3rd value of the grid, then on the whole grid. Each step has its own time
# limit, so one slow step cannot cost the others' figures. SMALL=1 DEVICE=cpu runs it at toy sizes (a check).
set -u
OUT_DIR=${1:-benchmarks/out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
mkdir -p "$OUT_DIR"
if [ "${SMALL:-0}" = 1 ]; then
    DEC="--images 16 --batch 8 --workers 2"; EXT="--vit-batch 4 --vit-batches 1 --rounds 1"
    LR="--n 2000 --n-val 500 --n-test 500 --d 128 --classes 10"
else
    DEC="--images 2048 --batch 128 --workers 8 --threads 4"; EXT="--vit-batch 256 --vit-batches 8 --rounds 3"
    LR="--real"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
rm -f benchmarks/out/bench_decode.json benchmarks/out/extraction.json
echo "== decode"; timeout 100 $PY -m benchmarks.bench_decode $DEC --rounds 2
cp benchmarks/out/bench_decode.json "$OUT_DIR"/ 2>/dev/null
echo "== extraction"; timeout 120 $PY -m benchmarks.bench_extraction --sections vit --device "$DEVICE" $EXT
cp benchmarks/out/extraction.json "$OUT_DIR"/ 2>/dev/null
echo "== logreg, scikit-learn on every 3rd value"
timeout ${EVERY3_TIMEOUT:-150} $PY -m benchmarks.bench_logreg $LR --device "$DEVICE" --sk-every 3 --out "$OUT_DIR/logreg_every3.json"
echo "== logreg, scikit-learn on the whole grid"
timeout ${WHOLE_TIMEOUT:-300} $PY -m benchmarks.bench_logreg $LR --device "$DEVICE" --out "$OUT_DIR/logreg_whole.json"
