# Quickstart: `make test` (tests) and `make demo` (the main job on its built-in default).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo sample clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (pinned to TORCH_VERSION; `make TORCH_VERSION=... test` to change it), then the project with its extras
# (triton too: the fused kernels' tests run under its interpreter)
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[video,dev,bench,triton]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job: adapt a small pixel-space UNet3D pretrained on shapes moving as captioned (domain A, shipped in
# examples/motion_bases/unet3d; pretrained once and cached if missing) to the same clips played backwards (domain B)
# with Tucker-LoRA through examples/train_text_to_video.py, reload the adapter in fresh processes and sample.
# motion_grid.png draws every frame of the base's and the adapter's samples of DEMO_PROMPTS (same noise) under an
# arrow of the way domain B moves them, with a check or a cross from the motion estimator; samples/grid.png shows
# the same adapter samples frame by frame. DEMO_SEEDS: seeds at which the base moves as its caption says, so that
# base and target differ in every pair.
DEMO ?= outputs/demo
MOTION = $(BIN)/python benchmarks/motion_experiment.py
DEMO_LAW = reversed
DEMO_PROMPTS = "a red circle moving left" "a blue square moving right"
DEMO_SEEDS = 1 2
DEMO_SAMPLING = --num_inference_steps 15 --guidance_scale 3
demo: $(STAMP)
	$(MOTION) base --out $(DEMO)/base_model
	$(MOTION) domain --law $(DEMO_LAW) --count 256 --out $(DEMO)/domain_b
	$(BIN)/python examples/train_text_to_video.py --pretrained_model_name_or_path $(DEMO)/base_model \
		--data_dir $(DEMO)/domain_b --ranks 4 4 3 1 1 --output_dir $(DEMO) --max_train_steps 300 \
		--train_batch_size 8 --learning_rate 2e-3 --no_ema --validation_steps 300 --checkpointing_steps 300 \
		--checkpoints_total_limit 1 $(DEMO_SAMPLING) --validation_prompts $(DEMO_PROMPTS) --validation_seeds $(DEMO_SEEDS)
	$(BIN)/python examples/sample_text_to_video.py --adapter $(DEMO)/adapter --prompts $(DEMO_PROMPTS) \
		--seeds $(DEMO_SEEDS) --num_frames 8 $(DEMO_SAMPLING) --output_dir $(DEMO)/samples
	$(MOTION) compare --adapter $(DEMO)/adapter --law $(DEMO_LAW) --prompts $(DEMO_PROMPTS) --seeds $(DEMO_SEEDS) \
		--num_frames 8 $(DEMO_SAMPLING) --out $(DEMO)/motion_grid.png

# Sample with a trained adapter (its base model is read from the adapter's config).
ADAPTER ?= $(DEMO)/adapter
SAMPLES ?= $(DEMO)/samples
sample: $(STAMP)
	$(BIN)/python examples/sample_text_to_video.py --adapter $(ADAPTER) --num_frames 8 --seeds 0 1 --output_dir $(SAMPLES)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
