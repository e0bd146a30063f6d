"""CLIP-T: text-video similarity with a CLIP model from a local folder.

For a video with frames ``x_1 .. x_N`` and prompt(s) ``p_1 .. p_P``, with ``e_I`` and ``e_T`` CLIP's projected
image and text embeddings scaled to unit length,

    CLIP-T(video) = (1 / (P N)) sum_p sum_n  e_T(p_p) . e_I(x_n)      (mean cosine similarity, in [-1, 1])

and the score of a set of videos is the mean over the videos. The folder is a transformers ``CLIPModel``
``save_pretrained`` folder with its tokenizer and image processor (``preprocessor_config.json``), e.g.
``openai/clip-vit-large-patch14`` downloaded beforehand; nothing is fetched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["ClipScorer"]


class ClipScorer:
    """A ``CLIPModel`` with its tokenizer and image processor, on ``device``, in eval mode."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.path, self.device = Path(path), torch.device(device)
        if not (self.path / "config.json").is_file():
            raise InputError(
                f"CLIP folder '{self.path}' has no config.json (expected a CLIPModel save_pretrained folder)"
            )
        if not (self.path / "preprocessor_config.json").is_file():
            raise InputError(f"CLIP folder '{self.path}' has no preprocessor_config.json (the CLIP image processor)")
        try:
            self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.processor = AutoImageProcessor.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise InputError(f"CLIP folder '{self.path}' cannot be loaded ({type(e).__name__}: {e})") from e
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, E) unit-length projected text embeddings ``e_T``."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, E) unit-length projected image embeddings ``e_I`` of N (H, W, 3) uint8 frames."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values.to(self.device)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def scores(self, videos: Sequence[np.ndarray], prompts: Sequence[Sequence[str]]) -> list[float]:
        """CLIP-T of each video: the mean of ``e_T(p) . e_I(x)`` over its prompts ``p`` and frames ``x``.

        One image batch holds every frame of ``videos`` and one text batch every prompt.
        """
        images = self.image_embeddings([frame for video in videos for frame in video])
        texts = self.text_embeddings([p for video_prompts in prompts for p in video_prompts])
        out, i, j = [], 0, 0
        for video, video_prompts in zip(videos, prompts, strict=True):
            out.append(float((texts[j : j + len(video_prompts)] @ images[i : i + len(video)].T).mean()))
            i, j = i + len(video), j + len(video_prompts)
        return out
