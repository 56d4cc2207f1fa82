"""The BLIP adapter beyond the contract suite: its facts at tiny and full size, dtypes, loading errors."""

from __future__ import annotations

import pytest
import torch

import helpers
from notice.errors import NoticeError
from notice.models import load_model
from notice.models.blip import BlipAdapter


def test_loads_saved_folder_with_model_facts(tiny_blip):
    arch = helpers.TINY_BLIP
    assert tiny_blip.family == "blip"
    assert tiny_blip.image_token_count() == (arch["image_size"] // arch["patch_size"]) ** 2 + 1
    vision, text, decoder = (tiny_blip.streams[k] for k in ("vision", "text", "decoder"))
    assert (vision.layers, vision.heads, vision.head_dim) == (2, 4, 8)
    assert (text.layers, text.heads, text.head_dim) == (2, 4, 8)
    assert decoder.layers == text.layers and "cross_attn" in decoder.components
    assert "cross_attn" not in vision.components


def test_full_size_architecture_facts_and_logits():
    """blip-vqa-base's real architecture (random init): 12x12 heads, 577 image tokens, 30524 logits."""
    arch = helpers.FULL_BLIP
    adapter = BlipAdapter(helpers.blip_model(arch), helpers.blip_processor(arch["image_size"]), "full-size")
    assert adapter.image_token_count() == 577
    assert all(adapter.streams[s].heads == 12 and adapter.streams[s].layers == 12 for s in adapter.streams)
    assert adapter.streams["text"].head_dim == 64
    logits = adapter.answer_logits([helpers.noise_image(384, 0)], ["what is in the picture?"])
    assert logits.shape == (1, 30524)
    assert torch.isfinite(logits).all()


def test_dtype_option_loads_bfloat16(tiny_blip_dir):
    adapter = load_model(str(tiny_blip_dir), dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    logits = adapter.answer_logits([helpers.noise_image(32, 0)], ["is it red?"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name, message", [
    ("no-such-org/no-such-model", "'no-such-org/no-such-model'"),  # offline or not: the hub cannot serve it
    ("easyvqa-blip-typo", "did you mean easyvqa-blip\\?"),
])
def test_unknown_or_unreachable_models_give_one_line_errors(name, message):
    with pytest.raises(NoticeError, match=message) as info:
        load_model(name)
    assert "\n" not in str(info.value)


def test_folder_without_config_is_named_in_the_error(tmp_path):
    with pytest.raises(NoticeError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_empty_question_is_refused(tiny_blip):
    with pytest.raises(NoticeError, match="empty question"):
        tiny_blip.answer_logits([helpers.noise_image(32, 0)], ["  "])
