"""LLaVA-OneVision (transformers' `LlavaOnevisionForConditionalGeneration`, e.g.
llava-hf/llava-onevision-qwen2-7b-ov-hf): LLaVA-NeXT's anyres (llava_next.py) with a SigLIP tower
(no [CLS]; every patch goes to the projector) and a Qwen2 language model.

    image ──base tile + up to 6x6 tiles of 384 px──▶ SigLIP, 27x27 patches per tile ──projector──▶
      ──pack: base tokens, the tiles' canvas unpadded, bilinearly shrunk when it holds more than
        `anyres_max_N` tiles' worth of tokens, a newline after each row──▶ I image tokens

The shrinking mixes neighbouring tile tokens, so a patch in any non-base tile reaches the canvas from
its first token (`first_image_position`); the engine reruns from there, exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from notice.models.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    first_patch = 0  # SigLIP has no [CLS]
    tower_name = "SigLIP vision tower"

    @classmethod
    def load_processor(cls, source: str | Path):
        """The checkpoint's processor; without torchvision (which its video half needs), its image half."""
        from transformers import LlavaOnevisionProcessor

        try:
            return LlavaOnevisionProcessor.from_pretrained(str(source))
        except ImportError:
            return image_only_processor(source)

    def tower_input(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return image_embeddings  # SigLIP's layers read the embeddings as they are

    def pack(self, tiles: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        features, _ = self.model.model.pack_image_features(tiles, sizes, image_newline=newline,
                                                           vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return features


def image_only_processor(source: str | Path):
    """LlavaOnevisionProcessor without its video processor (which needs torchvision even for images):
    images and prompts are processed exactly as by the full processor."""
    from transformers import LlavaOnevisionProcessor

    class ImageOnly(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                             chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)
    return ImageOnly.from_pretrained(str(source))
