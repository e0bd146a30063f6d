"""Score generated videos under the paper's protocol: FVD (I3D, cached reference statistics), CLIP-T, efficiency.

    python examples/evaluate_videos.py samples/ --reference-videos ref_videos/ --i3d i3d_torchscript.pt \
        --clip ./clip-vit-large-patch14 --num-frames 16 --resolution 224 --output scores.json
    python examples/evaluate_videos.py samples/ --reference-stats ref_stats.npz --i3d i3d_torchscript.pt
    python examples/evaluate_videos.py --train-log out/train_log.jsonl --adapter out/adapter
    python examples/evaluate_videos.py --help                                  # every option

The command lives in ``tucker_lora.eval.cli`` (importable, tested); this file is its command line.
"""

import sys

from tucker_lora.eval.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
