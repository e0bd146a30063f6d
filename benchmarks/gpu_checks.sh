#!/usr/bin/env bash
# The CUDA checks and GPU tables of the README, sized for a few minutes each on one H100:
#   tests      the compute paths against F.conv*d on CUDA (tests/test_paths.py, the cuda cases)
#   layers     the layer table (benchmarks/bench_layers.py), fp32, cuDNN's default algorithms and timed ones
#   compiled   the layer table with every column under torch.compile(mode="reduce-overhead") (CUDA graphs):
#              each method's cost once the host no longer issues its ops one by one (not yet run on a GPU)
#   unet       the end-to-end UNet3D table (benchmarks/bench_unet.py)
#   fsdp       FSDP2 against DDP and one plain process (benchmarks/bench_fsdp.py)
#   motion     the temporal-rank experiment, GPU preset, UNet3D backbone (benchmarks/motion_experiment.py):
#              pretrains the base (at most 3 min of training) into OUT/motion_cache, then adapts it
#   quick      the temporal-rank experiment's --quick run on CUDA (the pipeline only)
#
#   benchmarks/gpu_checks.sh OUT_DIR [SECTION ...]     # default: tests layers unet fsdp quick
set -u
OUT=${1:-gpu-results}
shift || true
SECTIONS=${*:-tests layers unet fsdp quick}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() { echo "== $1 ($(date +%T))"; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

if want tests; then
    step "CUDA tests"
    timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_paths.py -k cuda 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
fi
if want layers; then
    for variant in "" "--cudnn-benchmark"; do
        name=layers_fp32${variant:+_cudnn_benchmark}
        step "layer table, fp32 $variant"
        timeout 120 $PY benchmarks/bench_layers.py --device cuda --full-size --repeats 21 --warmup 5 $variant \
            --json "$OUT/$name.json" > "$OUT/$name.md" 2>&1
        grep -E "^\*\*|tucker|frozen base|LoRA|LyCORIS|full" "$OUT/$name.md"
    done
fi
if want compiled; then
    step "layer table, fp32, torch.compile reduce-overhead"
    timeout 300 $PY benchmarks/bench_layers.py --device cuda --full-size --repeats 21 --warmup 5 \
        --compile reduce-overhead --json "$OUT/layers_fp32_compiled.json" > "$OUT/layers_fp32_compiled.md" 2>&1
    grep -E "^\*\*|tucker|frozen base|LoRA|LyCORIS|full" "$OUT/layers_fp32_compiled.md"
fi
if want unet; then
    step "end-to-end UNet3D, fp32"
    timeout 240 $PY benchmarks/bench_unet.py --device cuda --channels 320 640 1280 1280 --frames 16 --size 32 \
        --steps 5 --warmup 2 --rounds 11 2>&1 | grep -v -i warn | tee "$OUT/unet_fp32.md"
fi
if want fsdp; then
    step "FSDP2 against DDP and one plain process (one GPU: FSDP shards nothing, this is its overhead)"
    timeout 80 $PY benchmarks/bench_fsdp.py --device cuda --num_processes 1 --steps 10 --output_dir /tmp/bench_fsdp \
        --json "$OUT/fsdp.json" -- --resolution 256 --num_frames 16 --train_batch_size 2 2>&1 | tail -8 | tee "$OUT/fsdp.md"
fi
if want motion; then
    step "temporal-rank experiment, GPU preset, UNet3D"
    timeout 480 $PY benchmarks/motion_experiment.py --device cuda --preset gpu --backbones unet3d \
        --max_minutes "${MOTION_MINUTES:-3}" --cache "$OUT/motion_cache" --out "$OUT/motion_unet3d" 2>&1 \
        | grep -v -i warn | tee "$OUT/motion_unet3d.log" | grep -E "step|seed|stopped|budget|results"
fi
if want quick; then
    step "temporal-rank experiment, --quick on CUDA (the pipeline on the GPU)"
    timeout 45 $PY benchmarks/motion_experiment.py --quick --device cuda --out /tmp/motion_quick 2>&1 | tail -6 | tee "$OUT/motion_quick.txt"
fi
step done
