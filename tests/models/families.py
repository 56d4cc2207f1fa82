"""One tiny builder per model family for the contract suite (tests/models/test_contract.py).

A family gives: a tiny random checkpoint saved like a user's (its weights drawn so that image and
question visibly move the answer), the image size its processor expects, and two references from
transformers' own code: the model's forward logits at the answer step, and its eager attention
weights where text meets the image. Adding a family to FAMILIES runs the whole suite on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import helpers
import tiny_qwen


@dataclass(frozen=True)
class Family:
    name: str
    image_size: int
    save: Callable[[Path], Path]  # writes a tiny checkpoint and its processor into a folder
    native_logits: Callable  # (adapter, inputs) → [B, V] from transformers' own forward
    eager_attention: Callable  # (adapter, inputs) → [L, H, T, image tokens of the grid] with eager attention


def eager(model):
    """Context: run `model` with transformers' eager attention (which returns attention weights)."""
    class Eager:
        def __enter__(self):
            self.previous = model.config._attn_implementation
            model.set_attn_implementation("eager")

        def __exit__(self, *exc):
            model.set_attn_implementation(self.previous)
    return Eager()


# ------------------------------------------------------------------------------ BLIP
def save_blip(folder: Path) -> Path:
    arch = helpers.TINY_BLIP
    helpers.sensitize(helpers.blip_model(arch)).save_pretrained(folder)
    helpers.blip_processor(arch["image_size"]).save_pretrained(folder)
    return folder


def blip_native_logits(adapter, inputs) -> torch.Tensor:
    """BlipForQuestionAnswering's modules end to end: vision, text encoder, the decoder's first step."""
    model = adapter.model
    image_states = model.vision_model(pixel_values=inputs.pixel_values)[0]
    question_states = model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                         encoder_hidden_states=image_states)[0]
    bos = torch.full((inputs.input_ids.shape[0], 1), model.config.text_config.bos_token_id)
    return model.text_decoder(input_ids=bos, encoder_hidden_states=question_states,
                              encoder_attention_mask=inputs.attention_mask).logits[:, 0]


def blip_eager_attention(adapter, inputs) -> torch.Tensor:
    model = adapter.model
    with eager(model):
        image_states = model.vision_model(pixel_values=inputs.pixel_values)[0]
        out = model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                 encoder_hidden_states=image_states, output_attentions=True)
    return torch.stack(out.cross_attentions, dim=1)[0, ..., 1:]  # grid patches: [CLS] dropped


# ----------------------------------------------------------------------------- LLaVA
def save_llava(folder: Path) -> Path:
    return helpers.save_llava(folder, helpers.TINY_LLAVA)


def llava_native_logits(adapter, inputs) -> torch.Tensor:
    return adapter.model(**inputs).logits[:, -1]


def llava_eager_attention(adapter, inputs) -> torch.Tensor:
    with eager(adapter.model):
        out = adapter.model(**inputs, output_attentions=True)
    grid = adapter.grid_positions(adapter.image_positions(inputs.input_ids[0]))
    return torch.stack(out.attentions, dim=1)[0][..., grid]


# --------------------------------------------------------------- BLIP-2, InstructBLIP
def qformer_native_logits(adapter, inputs) -> torch.Tensor:
    return adapter.model(**inputs).logits[:, -1]


def qformer_eager_attention(adapter, inputs) -> torch.Tensor:
    """The Q-Former's cross-attention (its cross-attention layers) to the grid patches, averaged over queries."""
    model = adapter.model
    with eager(model):
        image_states = model.vision_model(pixel_values=inputs.pixel_values).last_hidden_state
        queries = model.query_tokens.expand(image_states.shape[0], -1, -1)
        instruction = {}
        if "qformer_input_ids" in inputs:  # InstructBLIP: the prompt's wordpieces after the query tokens
            mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), inputs.qformer_attention_mask], dim=1)
            instruction = dict(input_ids=inputs.qformer_input_ids, attention_mask=mask)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=image_states, output_attentions=True,
                            **instruction)
    return torch.stack(out.cross_attentions, dim=1)[0, ..., 1:].mean(dim=2, keepdim=True)


# ------------------------------------------------------------------ Llama-3.2-Vision
def mllama_native_logits(adapter, inputs) -> torch.Tensor:
    return adapter.model(**inputs).logits[:, -1]


def mllama_eager_attention(adapter, inputs) -> torch.Tensor:
    """The cross-attention layers' attention to the image's patches (one tile: [CLS] dropped)."""
    with eager(adapter.model):
        out = adapter.model(**inputs, output_attentions=True)
    return torch.stack([out.attentions[l] for l in adapter.cross_layers], dim=1)[0, ..., 1:]


# --------------------------------------------------------------------------- Gemma 3
def save_gemma3(folder: Path) -> Path:
    return helpers.save_gemma3(folder, helpers.TINY_GEMMA3)


# ------------------------------------------------------------------- LLaVA-OneVision
def save_llava_onevision(folder: Path) -> Path:
    return helpers.save_llava_onevision(folder, helpers.TINY_ANYRES)


FAMILIES = {
    "blip": Family("blip", helpers.TINY_BLIP["image_size"], save_blip, blip_native_logits, blip_eager_attention),
    "llava": Family("llava", helpers.TINY_LLAVA["image_size"], save_llava, llava_native_logits, llava_eager_attention),
    **{kind: Family(kind, helpers.TINY_QFORMER["image_size"], functools.partial(helpers.save_qformer, kind=kind),
                    qformer_native_logits, qformer_eager_attention) for kind in ("blip-2", "instructblip")},
    # the base models' prompt (the Instruct chat template is tests/models/test_mllama.py's): a third as many cells
    "mllama": Family("mllama", helpers.TINY_MLLAMA["image_size"], functools.partial(helpers.save_mllama, instruct=False),
                     mllama_native_logits, mllama_eager_attention),
    # Qwen2-VL's own forward and attention read the same prepared inputs as LLaVA's
    **{name: Family(name, 64, functools.partial(tiny_qwen.save_qwen, family=name), llava_native_logits,
                    llava_eager_attention) for name in ("qwen2_vl", "qwen2_5_vl")},
    # the same references: transformers' forward and eager attention, token_type_ids from the processor
    "gemma3": Family("gemma3", helpers.TINY_GEMMA3["image_size"], save_gemma3, llava_native_logits,
                     llava_eager_attention),
    # pairs of 32x32 images: the base tile and 2x2 tiles, the largest expansion (see TINY_ANYRES)
    "llava_onevision": Family("llava_onevision", 32, save_llava_onevision, llava_native_logits,
                              llava_eager_attention),
}
