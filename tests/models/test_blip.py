"""The BLIP adapter: facts, logits, scoring and generation on real transformers models."""

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
    assert tiny_blip.num_image_tokens == (arch["image_size"] // arch["patch_size"]) ** 2 + 1
    vision, text, decoder = (tiny_blip.streams[k] for k in ("vision", "text", "decoder"))
    assert (vision.layers, vision.heads, vision.head_dim) == (2, 4, 8)
    assert (text.layers, text.heads, text.head_dim) == (2, 4, 8)
    assert decoder.layers == text.layers and "cross_attn" in decoder.components
    assert "cross_attn" not in vision.components


def test_full_size_architecture_facts_and_logits():
    """blip-vqa-base's real architecture (random init): 12x12 heads, 577 image tokens, 30524 logits."""
    arch = helpers.FULL_BLIP
    adapter = BlipAdapter(helpers.blip_model(arch), helpers.blip_processor(arch["image_size"]), "full-size")
    assert adapter.num_image_tokens == 577
    assert all(adapter.streams[s].heads == 12 and adapter.streams[s].layers == 12 for s in adapter.streams)
    assert adapter.streams["text"].head_dim == 64
    logits = adapter.answer_logits([helpers.noise_image(384, 0)], ["what is in the picture?"])
    assert logits.shape == (1, 30524)
    assert torch.isfinite(logits).all()


def test_answer_logits_match_transformers_decoder_first_step(tiny_blip):
    """Our staged forward equals BlipForQuestionAnswering's own modules run end to end."""
    image = helpers.shape_image(32)
    question = "what color is the shape?"
    ours = tiny_blip.answer_logits([image], [question])[0]
    model, processor = tiny_blip.model, tiny_blip.processor
    inputs = processor(images=image, text=question, return_tensors="pt")
    with torch.no_grad():
        image_states = model.vision_model(pixel_values=inputs["pixel_values"])[0]
        question_states = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                             encoder_hidden_states=image_states)[0]
        bos = torch.tensor([[model.config.text_config.bos_token_id]])
        theirs = model.text_decoder(input_ids=bos, encoder_hidden_states=question_states,
                                    encoder_attention_mask=inputs["attention_mask"]).logits[0, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_greedy_generation_starts_with_the_logit_argmax(tiny_blip):
    images = [helpers.noise_image(32, s) for s in range(3)]
    questions = ["is this red?", "what shape is it?", "is the shape red or blue?"]
    answers = tiny_blip.generate(images, questions, max_new_tokens=1)
    logits = tiny_blip.answer_logits(images, questions)
    expected = tiny_blip.tokenizer.convert_ids_to_tokens(logits.argmax(1).tolist())
    assert [a.replace(" ", "") for a in answers] == [e.replace("##", "") for e in expected]


def test_batches_never_mix_question_lengths(tiny_blip):
    questions = ["is it red?", "what color is the big shape?", "is it blue?", "what shape?"]
    for batch in tiny_blip.batches_by_length(questions, batch_size=8):
        assert len({tiny_blip.token_length(questions[i]) for i in batch}) == 1
    images = [helpers.noise_image(32, 1)] * 4
    together = tiny_blip.answer_logits(images, questions)
    alone = torch.cat([tiny_blip.answer_logits([images[i]], [q]) for i, q in enumerate(questions)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_multi_wordpiece_answers_scored_by_first_token_or_sequence(tiny_blip):
    image, question = helpers.noise_image(32, 2), "what is this?"
    word = "sunflowers"  # several wordpieces in bert-base-uncased
    pieces = tiny_blip.answer_token_ids(word)
    assert len(pieces) > 1
    first = tiny_blip.score_answers([image], [question], [word], scoring="first_token")[0, 0]
    sequence = tiny_blip.score_answers([image], [question], [word], scoring="sequence")[0, 0]
    logp = torch.log_softmax(tiny_blip.answer_logits([image], [question])[0], -1)
    torch.testing.assert_close(first, logp[pieces[0]], atol=1e-5, rtol=1e-5)
    assert sequence < first  # adding log-probabilities of further pieces can only lower it
    single = "red"
    assert len(tiny_blip.answer_token_ids(single)) == 1
    both = tiny_blip.score_answers([image], [question], [single], scoring="sequence")[0, 0]
    torch.testing.assert_close(both, logp[tiny_blip.answer_token_ids(single)[0]], atol=1e-5, rtol=1e-5)


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
