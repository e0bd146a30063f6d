#!/usr/bin/env bash
# The Python packages benchmarks/gpu_checks.sh needs that the GPU machine's image lacks (or has at another version),
# as wheels in .whl/ of the repository root (ignored by git), for a machine with no network (Python 3.12, x86-64).
# Run it here, once (`bash benchmarks/gpu_wheels.sh`), then carry ".whl" with the call (gpu_checks.sh installs them
# into /tmp/site and puts it first on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl
# peft at the version the tuner is written for; diffusers (the UNet3D), tensorly (tucker_lora.init), lycoris-lora
# (the LyCORIS column) and what they import that the image does not hold (importlib_metadata, toml)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    peft==0.21.2 diffusers==0.42.1 tensorly==0.10.0 lycoris-lora==4.1.3 importlib_metadata==8.7.0 toml==0.10.2
ls -la .whl
du -sh .whl
