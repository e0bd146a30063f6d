#!/usr/bin/env bash
# The GPU checks as ONE call on the GPU machine (sized for an H200: at most 6 minutes, GPU_CHECKS_BUDGET=320 seconds
# for the sections together, each also under its own cap, so a section that hangs costs only its own results):
#   tests        the CUDA cases of the tests (pytest -m cuda: the compute paths and the fused Triton kernels)
#   layers_fp32  the layer table (benchmarks/bench_layers.py, the issue's sizes), fp32, synced and pipelined, every
#                column interleaved, with the column "tucker auto, fused" (the fused Triton kernels on)
#   unet_bf16    the end-to-end UNet3D at full block widths (benchmarks/bench_unet.py --in-process), bf16 autocast,
#                every method (the fused one too) interleaved in one process
#   layers_bf16  the layer table in bf16 autocast
#   unet_fp32    the end-to-end UNet3D in fp32
#   compiled_ro  the layer table compiled, mode="reduce-overhead" (CUDA graphs): frozen, Tucker auto and peft LoRA on
#                the 1280-channel 3x3x3 layer
#   compiled_ma  the same, mode="max-autotune-no-cudagraphs"
#
#   bash benchmarks/gpu_checks.sh [SECTION ...]          # on the GPU machine, from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh --cpu-dry-run   # here: tiny sizes, CPU, every section
#
# Packages the machine's image lacks travel as wheels in .whl/ (benchmarks/gpu_wheels.sh makes it; carry ".whl"):
# they are installed into /tmp/site, first on PYTHONPATH, and the project runs from src/ (no install).
# Results in $OUT (./gpu-results without it): gpu.md (the tables, ready for docs/gpu.md), results.json, log.txt
# (every section's output) and raw.tar.gz (each section's own files).
set -u
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; shift; fi
SECTIONS=${*:-tests layers_fp32 unet_bf16 layers_bf16 unet_fp32 compiled_ro compiled_ma}
OUT=${OUT:-$PWD/gpu-results}
BUDGET=${GPU_CHECKS_BUDGET:-$((DRY ? 3600 : 320))}
CAP_SCALE=$((DRY ? 20 : 1))  # the CPU dry run gets 20 times each section's cap (and a budget of an hour)
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_checks.XXXXXX)
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if ((DRY)); then
    export TRITON_INTERPRET=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    DEV=(--device cpu)
    LAYERS=(--only 4 --repeats 1 --warmup 1)
    COMPILED=(--only 4 --repeats 1 --warmup 1)
    UNET=(--device cpu --channels 32 64 --frames 2 --size 8 --warmup 1 --rounds 1)
    TESTS=(tests/test_fused_kernels.py -k "conv3d-default and factored")  # on the CPU: no cuda cases to select
else
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "wheel install failed"
        export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/ here: using the image's packages (diffusers, tensorly and lycoris-lora may be missing)"
        export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi -L
    DEV=(--device cuda --full-size)
    LAYERS=(--repeats 11 --warmup 3)
    COMPILED=(--only 2 --repeats 11 --warmup 3)
    UNET=(--device cuda --channels 320 640 1280 1280 --frames 16 --size 32 --warmup 2 --rounds 7)
    TESTS=(-m cuda tests/test_paths.py tests/test_fused_kernels.py)
fi
$PY -c "import torch, tucker_lora; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# run NAME CAP COMMAND...: COMMAND under `timeout` (CAP seconds, less if the budget has less left), its output in
# WORK/NAME.log (the last lines echoed), and "NAME rc=RC SECONDSs" (or "NAME skipped") in WORK/status
run() {
    local name=$1 cap=$2 begin left limit rc
    shift 2
    want "$name" || return 0
    begin=$(date +%s)
    left=$((BUDGET - (begin - START)))
    if ((left < 15)); then
        echo "== $name: skipped, the budget is spent"
        echo "$name skipped" >>"$WORK/status"
        return 0
    fi
    cap=$((cap * CAP_SCALE))
    limit=$((cap < left ? cap : left))
    echo "== $name ($(date +%T), at most ${limit}s)"
    timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    tail -n 12 "$WORK/$name.log"
    echo "$name rc=$rc $(($(date +%s) - begin))s" >>"$WORK/status"
}

LAYERS_PY=(benchmarks/bench_layers.py "${DEV[@]}")
UNET_PY=(benchmarks/bench_unet.py "${UNET[@]}" --in-process --fused)
run tests 80 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
run layers_fp32 45 $PY "${LAYERS_PY[@]}" "${LAYERS[@]}" --fused --json "$WORK/layers_fp32.json"
run unet_bf16 45 $PY "${UNET_PY[@]}" --autocast bf16 --json "$WORK/unet_bf16.json"
run layers_bf16 35 $PY "${LAYERS_PY[@]}" "${LAYERS[@]}" --fused --autocast bf16 --json "$WORK/layers_bf16.json"
run unet_fp32 40 $PY "${UNET_PY[@]}" --json "$WORK/unet_fp32.json"
run compiled_ro 40 $PY "${LAYERS_PY[@]}" "${COMPILED[@]}" --compile reduce-overhead --columns "tucker auto" "peft LoRA" \
    --json "$WORK/compiled_ro.json"
run compiled_ma 45 $PY "${LAYERS_PY[@]}" "${COMPILED[@]}" --compile max-autotune-no-cudagraphs \
    --columns "tucker auto" "peft LoRA" --json "$WORK/compiled_ma.json"

echo "== report ($(date +%T), $(($(date +%s) - START))s since the start)"
COMMAND="bash benchmarks/gpu_checks.sh"
((DRY)) && COMMAND+=" --cpu-dry-run"
[[ -n "${*:-}" ]] && COMMAND+=" $*"
$PY benchmarks/gpu_report.py "$WORK" "$OUT" --command "$COMMAND" >"$WORK/report.log" 2>&1 || tail -n 20 "$WORK/report.log"
for f in "$WORK"/*.log; do
    echo "===== $(basename "$f")"
    cat "$f"
done >"$OUT/log.txt"
tar czf "$OUT/raw.tar.gz" -C "$WORK" .
cat "$OUT/gpu.md" 2>/dev/null | head -n 200
echo "== done in $(($(date +%s) - START))s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
