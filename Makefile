# Quickstart: `make test` (tests) and `make demo` (the main job on its built-in default).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo sample clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (a pinned CPU build, see DEVELOPERS.md), then the project with its extras
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[video,dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job on its built-in default: fine-tune a tiny random text-to-video UNet3D with Tucker-LoRA on
# synthetic moving shapes, save the adapter, then reload it in a fresh process and sample (CPU, about a minute).
DEMO ?= outputs/demo
demo: $(STAMP)
	$(BIN)/python examples/train_text_to_video.py --output_dir $(DEMO) --max_train_steps 400 --learning_rate 5e-3 \
		--validation_steps 200 --checkpointing_steps 200 --checkpoints_total_limit 1
	$(MAKE) --no-print-directory sample ADAPTER=$(DEMO)/adapter_ema SAMPLES=$(DEMO)/samples

# Sample with a trained adapter (its base model is read from the adapter's config).
ADAPTER ?= $(DEMO)/adapter_ema
SAMPLES ?= $(DEMO)/samples
sample: $(STAMP)
	$(BIN)/python examples/sample_text_to_video.py --adapter $(ADAPTER) --num_frames 8 --seeds 0 1 --output_dir $(SAMPLES)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
