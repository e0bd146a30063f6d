"""Fine-tune a text-to-video diffusion model with Tucker-LoRA (or the matched peft LoRA baseline).

    python examples/train_text_to_video.py --output_dir outputs/t2v            # tiny default, synthetic data
    accelerate launch examples/train_text_to_video.py \
        --pretrained_model_name_or_path ./zeroscope_v2_576w --data_dir ./MSRVTT --output_dir outputs/zeroscope
    python examples/train_text_to_video.py --help                               # every option

The training loop lives in ``tucker_lora.video.train`` (importable, tested); this file is its command line.
"""

import sys

from tucker_lora.video.train import cli

if __name__ == "__main__":
    sys.exit(cli())
