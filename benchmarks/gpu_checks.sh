#!/usr/bin/env bash
# The CUDA checks and GPU tables of the README in one go, sized for a few minutes on one H100:
# the compute paths against F.conv*d on CUDA (tests/test_paths.py, the cuda cases), the layer table
# (benchmarks/bench_layers.py), the end-to-end UNet table (benchmarks/bench_unet.py), FSDP against
# plain training (benchmarks/bench_fsdp.py) and the temporal-rank experiment (benchmarks/motion_experiment.py).
#
#   benchmarks/gpu_checks.sh OUT_DIR        # needs torch with CUDA and the project's dependencies
set -u
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() { echo "== $1 ($(date +%T))"; }

step "CUDA tests"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_paths.py -k cuda 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
step "layer table, fp32"
timeout 100 $PY benchmarks/bench_layers.py --device cuda --full-size --repeats 21 --warmup 5 \
    --json "$OUT/layers_fp32.json" > "$OUT/layers_fp32.md" 2>&1
grep -E "^\*\*|tucker auto|frozen base|LoRA|LyCORIS" "$OUT/layers_fp32.md"
step "end-to-end UNet3D, fp32"
timeout 120 $PY benchmarks/bench_unet.py --device cuda --channels 320 640 1280 1280 --frames 16 --size 32 \
    --steps 5 --warmup 2 2>&1 | grep -v -i warn | tee "$OUT/unet_fp32.md"
step "FSDP2 against DDP and one plain process (one GPU: FSDP shards nothing, this is its overhead)"
timeout 80 $PY benchmarks/bench_fsdp.py --device cuda --num_processes 1 --steps 10 --output_dir /tmp/bench_fsdp \
    --json "$OUT/fsdp.json" -- --resolution 256 --num_frames 16 --train_batch_size 2 2>&1 | tail -8 | tee "$OUT/fsdp.md"
step "temporal-rank experiment, --quick on CUDA (the pipeline on the GPU; the full GPU preset takes far longer)"
timeout 45 $PY benchmarks/motion_experiment.py --quick --device cuda --out /tmp/motion_quick 2>&1 | tail -6 | tee "$OUT/motion_quick.txt"
step done
