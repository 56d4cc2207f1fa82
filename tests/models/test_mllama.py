"""Llama-3.2-Vision beyond the contract suite: cross-attention sites on the cross-attention layers only,
the rows before the image token, the image reaching the text only through cross-attention, and the
checkpoints notice refuses."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import helpers
from notice.errors import NoticeError
from notice.models import load_model
from notice.models.base import Run
from notice.patching.engine import patch_pair
from notice.patching.inputs import pair_runs
from notice.patching.sites import expand_sites

QUESTION = "what color is the shape?"
ARCH = helpers.TINY_MLLAMA


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return load_model(str(helpers.save_mllama(tmp_path_factory.mktemp("tiny-mllama"))))


def _run(adapter, image=None) -> Run:
    return Run(adapter.prepare([image or helpers.shape_image(ARCH["image_size"])], [QUESTION]))


def _image_position(adapter, run: Run) -> int:
    return int((run.inputs.input_ids[0] == adapter.image_token_id).nonzero()[0, 0])


def test_cross_attention_sites_exist_on_the_cross_attention_layers_only(mllama):
    run = _run(mllama)
    counts = mllama.num_positions(run)
    cross = list(ARCH["cross_layers"])
    sites = expand_sites(["lm.*.cross_attn.head*"], mllama.streams, counts)
    assert {s.layer for s in sites} == set(cross)
    assert {s.head for s in sites} == set(range(ARCH["text_heads"]))
    assert {s.position for s in sites} == set(range(counts["lm"]))  # every prompt token reads the image
    self_layers = {s.layer for s in expand_sites(["lm.*.self_attn"], mllama.streams, counts)}
    assert self_layers == set(range(ARCH["text_layers"])) - set(cross)
    with pytest.raises(NoticeError, match=f"layer {cross[0]} of lm has no self_attn"):
        expand_sites([f"lm.{cross[0]}.self_attn.head0"], mllama.streams, counts)
    with pytest.raises(NoticeError, match="layer 0 of lm has no cross_attn"):
        expand_sites(["lm.0.cross_attn"], mllama.streams, counts)


def test_the_prompt_holds_one_image_token_and_the_image_no_text_positions(mllama):
    run = _run(mllama)
    labels = mllama.position_labels(run)
    assert labels["lm"].count("<|image|>") == 1 and labels["lm"][0] == "<|begin_of_text|>"
    assert labels["lm"][-3:] == ["<|end_header_id|>", "Ċ", "Ċ"]  # the assistant header, where the answer is read
    tile = (ARCH["image_size"] // ARCH["patch_size"]) ** 2 + 1
    assert mllama.image_token_count() == tile * ARCH["tiles"]
    assert mllama.num_positions(run)["vision"] == len(labels["vision"]) >= tile  # padded to a multiple of 8
    assert mllama.describe()["gates"][f"lm.{ARCH['cross_layers'][0]}"]["cross_attn"] != 0


def test_rows_before_the_image_token_read_the_image_but_add_no_mlp_write(mllama, tmp_path):
    """transformers' mask: a row that precedes the image token still cross-attends every image token (its
    mask row is zeroed, not closed), and its MLP write in a cross-attention layer is dropped."""
    run = _run(mllama)
    first = _image_position(mllama, run)
    assert first > 0
    trace = mllama.trace(run, {"lm"})
    keep = trace.cache["keep"][:, 0]
    assert keep[:first].eq(0).all() and keep[first:].eq(1).all()
    assert trace.cache["cross_mask"][:first].eq(0).all()
    other = mllama.trace(_run(mllama, helpers.shape_image(ARCH["image_size"], (0, 0, 255), "triangle")), {"lm"})
    for l in ARCH["cross_layers"]:
        acts, gate = trace.acts[("lm", l)], mllama.lm.layers[l].cross_attn_attn_gate.tanh()
        torch.testing.assert_close(acts["layer"][:first], acts["x"][:first] + gate * acts["cross_attn"][:first])
        assert not torch.allclose(acts["cross_attn"][:first], other.acts[("lm", l)]["cross_attn"][:first])
        assert acts["mlp"][:first].abs().max() > 1e-3  # the MLP ran there; its write is what the layer drops
    pair = helpers.make_pairs(tmp_path, ARCH["image_size"])["image_smp"]
    cross = ARCH["cross_layers"][0]
    last = mllama.num_positions(run)["lm"] - 1
    table = patch_pair(mllama, pair, [f"lm.{cross}.mlp@{p}" for p in [*range(first), last]])
    before, answer = table[table["position"] < first], table[table["position"] == last]
    baseline = float(before["ld"].iloc[0])
    assert before["ld"].sub(baseline).abs().max() < 1e-5  # one effect, none: the write is dropped there
    assert abs(float(answer["ld"].iloc[0]) - baseline) > 1e-3  # after the image token, the write counts


def test_an_image_corruption_reaches_the_text_only_through_cross_attention(mllama, tmp_path):
    """Under an image pair the two prompts are one: every LM layer before the first cross-attention layer
    holds the same activations in both runs, and differs after it."""
    pair = helpers.make_pairs(tmp_path, ARCH["image_size"])["image_smp"]
    clean, corrupt = pair_runs(mllama, pair)
    a, b = mllama.trace(clean, {"lm"}), mllama.trace(corrupt, {"lm"})
    cross = ARCH["cross_layers"][0]
    for l in range(cross):
        assert torch.equal(a.acts[("lm", l)]["layer"], b.acts[("lm", l)]["layer"])
    assert not torch.allclose(a.acts[("lm", cross)]["layer"], b.acts[("lm", cross)]["layer"])


def test_a_text_only_llama_3_2_checkpoint_is_refused_in_one_line(tmp_path):
    from transformers import MllamaTextConfig

    from notice.cli import app

    MllamaTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mllama_text_model"
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "model type 'mllama_text_model'" in message and "is not supported" in message
    assert "mllama" in message.split("notice reads")[1]
    assert len(result.output.strip().splitlines()) <= 2  # one line (the terminal may wrap it)


def test_a_processor_that_tiles_other_than_the_vision_model_is_refused(tmp_path):
    from notice.models.mllama import MllamaAdapter

    folder = helpers.save_mllama(tmp_path / "model")
    processor = MllamaAdapter.load_processor(folder)
    processor.image_processor.max_image_tiles = ARCH["tiles"] + 1
    processor.save_pretrained(folder)
    with pytest.raises(NoticeError, match="cuts images into up to 2 tiles but the vision model reads 1"):
        load_model(str(folder))


def test_a_prompt_with_a_second_image_is_refused(mllama):
    image = helpers.shape_image(ARCH["image_size"])
    with pytest.raises(NoticeError, match="holds <\\|image\\|>: notice gives Llama-3.2-Vision one image per prompt"):
        mllama.prepare([image], ["<|image|> what color is the shape?"])
    with pytest.raises(NoticeError, match="one image per prompt"):
        mllama.embed_images(mllama.processor(images=[[image, image]], text=["<|image|><|image|>?"], return_tensors="pt"))


def test_a_base_checkpoint_reads_the_image_token_then_the_question(tmp_path):
    adapter = load_model(str(helpers.save_mllama(tmp_path / "base", instruct=False)))
    assert adapter.prompt(QUESTION) == f"<|image|><|begin_of_text|>{QUESTION}"
    labels = adapter.position_labels(_run(adapter))["lm"]
    assert labels[:2] == ["<|image|>", "<|begin_of_text|>"] and labels[-1] == "?"
