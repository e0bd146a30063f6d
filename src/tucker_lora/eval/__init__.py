"""Evaluation under the paper's protocol (the ``video`` extra: PyAV, transformers for CLIP-T).

One module per job:

- ``frechet``: the Frechet distance between Gaussians, eigen-based (solid for near-singular covariances);
- ``stats``: reference statistics ``.npz`` (mu, sigma, count, settings), written atomically, settings checked;
- ``videos``: a folder of videos -> N frames each (centre sampling), resized and scaled for the detector;
- ``inception_i3d`` / ``i3d``: the I3D network and loading the FVD detector (TorchScript or a state dict);
- ``clip_score``: CLIP-T, the mean text-frame cosine similarity of a ``CLIPModel`` from a local folder;
- ``efficiency``: peak memory, throughput and wall clock from the training log, trainable parameters of an
  adapter checkpoint, time-to-target FVD;
- ``protocol``: scoring a folder and caching the reference statistics; ``cli``: the command
  (``examples/evaluate_videos.py``, ``python -m tucker_lora.eval``).
"""

from .efficiency import time_saved, time_to_target, trainable_parameters, training_efficiency
from .frechet import frechet_distance, gaussian_fit
from .stats import FeatureStats, SettingsMismatchError, load_stats

__all__ = [
    "FeatureStats",
    "SettingsMismatchError",
    "frechet_distance",
    "gaussian_fit",
    "load_stats",
    "time_saved",
    "time_to_target",
    "trainable_parameters",
    "training_efficiency",
]
