"""Tiny random Qwen2-VL and Qwen2.5-VL checkpoints, saved like a user's (tests/models/families.py).

The tokenizer is a byte-level BPE (as Qwen2's) trained here on a few sentences, with Qwen's special
tokens; the chat template writes Qwen2-VL's prompt format, default system prompt included. The
processor cuts 4 px patches merged 2×2 and resizes images to at most 24×24 px, so a 64 px image gives
a 6×6 patch grid and 9 image tokens; Qwen2.5-VL's 16 px windows (2×2 tokens) tile that unevenly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import helpers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCES = helpers.LLAVA_SENTENCES + ["system user assistant You are a helpful assistant."]
TINY = dict(patch=4, merge=2, max_side=24, vision_hidden=32, vision_layers=3, vision_heads=4, text_hidden=64,
            text_layers=3, text_heads=4, text_kv_heads=2, text_mlp=128, window=16)


def qwen_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def qwen_processor(family: str, arch: dict = TINY):
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from notice.models.qwen2_vl import image_only

    side = arch["max_side"]
    images = Qwen2VLImageProcessorPil(patch_size=arch["patch"], merge_size=arch["merge"], temporal_patch_size=2,
                                      min_pixels=(arch["patch"] * arch["merge"]) ** 2, max_pixels=side * side)
    processor_class = getattr(transformers, "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor")
    return image_only(processor_class)(image_processor=images, tokenizer=qwen_tokenizer(), chat_template=CHAT_TEMPLATE)


def qwen_model(family: str, tokenizer, arch: dict = TINY, seed: int = 0):
    """A random-init model whose weights are redrawn at unit gain, so that image and question move the answer."""
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    half = arch["text_hidden"] // arch["text_heads"] // 2  # rotary frequencies per head: time, rows, columns
    time = half // 4
    text = dict(vocab_size=len(tokenizer), hidden_size=arch["text_hidden"], intermediate_size=arch["text_mlp"],
                num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
                num_key_value_heads=arch["text_kv_heads"], max_position_embeddings=512,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [time, (half - time) // 2, half - time - (half - time) // 2]})
    vision = dict(depth=arch["vision_layers"], num_heads=arch["vision_heads"], patch_size=arch["patch"],
                  spatial_merge_size=arch["merge"], temporal_patch_size=2, in_channels=3)
    if family == "qwen2_5_vl":
        last = arch["vision_layers"] - 1
        vision.update(hidden_size=arch["vision_hidden"], intermediate_size=2 * arch["vision_hidden"],
                      out_hidden_size=arch["text_hidden"], window_size=arch["window"], fullatt_block_indexes=[last])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=arch["vision_hidden"], hidden_size=arch["text_hidden"], mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    return helpers.sensitize(model_class(config).eval(), seed)


# seeds whose model moves its answer by at least 0.2 in logit difference on every pair kind of
# helpers.make_pairs: normalized effects, compared to 1e-4, divide by that gap
SEEDS = {"qwen2_vl": 2, "qwen2_5_vl": 8}


def save_qwen(folder: Path, family: str, arch: dict = TINY) -> Path:
    """The checkpoint and processor; processor_config.json names the family's processor class, as a
    released checkpoint's does (this one was built without torchvision, so without a video processor)."""
    processor = qwen_processor(family, arch)
    qwen_model(family, processor.tokenizer, arch, SEEDS[family]).save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["processor_class"] in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    return folder
