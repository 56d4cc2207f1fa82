"""The LLaVA adapter beyond the contract suite: facts, chat template, positions, teacher-forced scores,
loading options, and llava-1.5-7b's geometry."""

from __future__ import annotations

import pytest
import torch

import helpers
from notice.errors import NoticeError
from notice.models import load_model
from notice.models.llava import LlavaAdapter

QUESTION = "what color is the shape?"


def test_loads_saved_folder_with_model_facts(tiny_llava):
    arch = helpers.TINY_LLAVA
    assert isinstance(tiny_llava, LlavaAdapter) and tiny_llava.family == "llava"
    grid = arch["image_size"] // arch["patch_size"]
    assert tiny_llava.image_token_count() == grid * grid  # "default" strategy drops [CLS]
    vision, projector, lm = (tiny_llava.streams[k] for k in ("vision", "projector", "lm"))
    assert vision.layers == arch["vision_layers"] - 1  # feature layer -2: the last layer never reaches the LM
    assert (lm.layers, lm.heads, lm.head_dim) == (arch["text_layers"], arch["text_heads"], 8)
    assert tiny_llava.blocks["lm"][0].kv_heads == arch["text_kv_heads"] < lm.heads
    assert projector.layers == 1 and projector.components == ("layer",)


def test_prompt_comes_from_the_chat_template(tiny_llava):
    prompt = tiny_llava.prompt(QUESTION)
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:") and QUESTION in prompt


def test_positions_are_read_from_the_expanded_input_ids(tiny_llava):
    inputs = tiny_llava.prepare([helpers.shape_image(32)], [QUESTION])
    ids = inputs.input_ids[0]
    span = tiny_llava.image_positions(ids).tolist()
    assert span == list(range(span[0], span[-1] + 1)) and len(span) == tiny_llava.image_token_count()
    assert all(int(ids[p]) == tiny_llava.image_token_id for p in span)
    assert tiny_llava.answer_position(ids) == len(ids) - 1 == tiny_llava.token_length(QUESTION) - 1
    words = tiny_llava.question_positions(QUESTION)
    spelled = tiny_llava.tokenizer.decode(ids[words[0]:words[-1] + 1]).strip()
    assert spelled == QUESTION and words[0] > span[-1]
    alone = list(range(1, len(tiny_llava.tokenizer(QUESTION)["input_ids"])))  # every word after <s>
    assert tiny_llava.prompt_positions(QUESTION, alone) == words


def test_a_prompt_without_one_image_run_is_refused(tiny_llava):
    ids = torch.tensor([1, 5, 6, 7])
    with pytest.raises(NoticeError, match="image tokens"):
        tiny_llava.image_positions(ids)


def test_multi_token_answers_scored_by_first_token_or_sequence(tiny_llava):
    image = helpers.noise_image(32, 2)
    word = "sunflowers"  # many BPE pieces in the test vocabulary
    pieces = tiny_llava.answer_token_ids(word)
    assert len(pieces) > 1
    first = tiny_llava.score_answers([image], [QUESTION], [word], scoring="first_token")[0, 0]
    sequence = tiny_llava.score_answers([image], [QUESTION], [word], scoring="sequence")[0, 0]
    logp = torch.log_softmax(tiny_llava.answer_logits([image], [QUESTION])[0], -1)
    torch.testing.assert_close(first, logp[pieces[0]], atol=1e-5, rtol=1e-5)
    assert sequence < first
    # the sequence score equals transformers' own teacher-forced forward over prompt + answer
    inputs = tiny_llava.prepare([image], [QUESTION])
    ids = torch.cat([inputs.input_ids, torch.tensor([pieces])], dim=1)
    with torch.no_grad():
        logits = tiny_llava.model(input_ids=ids, pixel_values=inputs.pixel_values).logits[0]
    prompt_length = inputs.input_ids.shape[1]
    expected = sum(torch.log_softmax(logits[prompt_length - 1 + i], -1)[p] for i, p in enumerate(pieces))
    torch.testing.assert_close(sequence, expected, atol=1e-4, rtol=1e-5)


def test_dtype_option_loads_bfloat16(tiny_llava_dir):
    adapter = load_model(str(tiny_llava_dir), dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    logits = adapter.answer_logits([helpers.noise_image(32, 0)], ["is it red?"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_four_bit_loading_without_bitsandbytes_is_a_one_line_error(tiny_llava_dir):
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed: 4-bit loading is available")
    except ImportError:
        pass
    with pytest.raises(NoticeError, match="bitsandbytes") as info:
        load_model(str(tiny_llava_dir), load_in_4bit=True)
    assert "\n" not in str(info.value)


def test_four_bit_is_refused_for_blip(tiny_blip_dir):
    with pytest.raises(NoticeError, match="LLaVA"):
        load_model(str(tiny_blip_dir), load_in_4bit=True)


def test_empty_question_is_refused(tiny_llava):
    with pytest.raises(NoticeError, match="empty question"):
        tiny_llava.answer_logits([helpers.noise_image(32, 0)], ["  "])


def test_llava_1_5_7b_architecture_facts_without_weights():
    """llava-hf/llava-1.5-7b-hf's config (built on the meta device): 576 image tokens, 23 CLIP layers
    feeding the projector (feature layer -2), 32x32 LM heads of size 128; positions come from the ids."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    processor = helpers.llava_processor(336, 14)
    vision = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                  num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768)
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_hidden_layers=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    adapter = LlavaAdapter(model, processor, "llava-1.5-7b (meta)")
    assert adapter.image_token_count() == 576
    assert adapter.streams["vision"].layers == 23
    lm = adapter.streams["lm"]
    assert (lm.layers, lm.heads, lm.head_dim, adapter.blocks["lm"][0].kv_heads) == (32, 32, 128, 32)
    ids = processor(images=helpers.noise_image(336, 0), text=adapter.prompt(QUESTION), return_tensors="pt")["input_ids"][0]
    span = adapter.image_positions(ids)
    assert len(span) == 576
    assert adapter.answer_position(ids) == len(ids) - 1 and int(span[-1]) < len(ids) - 1
