"""Sample text-to-video with a trained Tucker-LoRA (or LoRA) adapter: MP4/GIF per prompt and seed + a frame grid.

    python examples/sample_text_to_video.py --adapter outputs/demo/adapter_ema --num_frames 8
    python examples/sample_text_to_video.py --pretrained_model_name_or_path ./zeroscope_v2_576w \
        --adapter outputs/zeroscope/adapter_ema --merge --prompts "a dog running on the beach" --seeds 0 1 2
    python examples/sample_text_to_video.py --help                               # every option

The sampler lives in ``tucker_lora.video.sample`` (importable, tested); this file is its command line.
"""

import sys

from tucker_lora.video.sample import cli

if __name__ == "__main__":
    sys.exit(cli())
