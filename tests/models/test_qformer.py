"""BLIP-2 and InstructBLIP beyond the contract suite: the Q-Former's positions and sites, prompts, the
language models notice runs and those it refuses, and half-precision loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import helpers
from notice.errors import NoticeError
from notice.models import load_model
from notice.models.base import Run
from notice.pairs import Pair
from notice.patching.engine import patch_pair, patch_pairs
from notice.patching.sites import expand_sites

QUESTION = "what color is the shape?"
ARCH = helpers.TINY_QFORMER


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    return load_model(str(helpers.save_qformer(tmp_path_factory.mktemp("tiny-instructblip"), "instructblip")))


def test_qformer_positions_are_the_query_tokens_then_the_instructions_wordpieces(instructblip):
    run = Run(instructblip.prepare([helpers.shape_image(32)], [QUESTION]))
    labels = instructblip.position_labels(run)
    queries = [f"query {i}" for i in range(ARCH["queries"])]
    bert = instructblip.processor.qformer_tokenizer.tokenize(instructblip.prompt(QUESTION))
    assert labels["qformer"] == queries + ["[CLS]"] + bert + ["[SEP]"]
    assert labels["projector"] == queries and instructblip.image_token_count() == ARCH["queries"]
    ids = run.inputs.input_ids[0]
    assert instructblip.image_positions(ids).tolist() == list(range(ARCH["queries"]))  # before BOS
    assert labels["lm"][:ARCH["queries"]] == [f"<image {q}>" for q in queries]
    assert int(ids[ARCH["queries"]]) == instructblip.tokenizer.bos_token_id
    assert instructblip.prompt(QUESTION) == f"Question: {QUESTION} Short answer:"


def test_cross_attention_sites_exist_on_the_cross_attention_layers_at_the_query_tokens(instructblip):
    counts = instructblip.num_positions(Run(instructblip.prepare([helpers.shape_image(32)], [QUESTION])))
    crossing = [l for l, layer in enumerate(instructblip.model.qformer.encoder.layer) if layer.has_cross_attention]
    assert crossing == list(range(0, ARCH["qformer_layers"], ARCH["cross_every"])) and len(crossing) > 1
    sites = expand_sites(["qformer.*.cross_attn.head*"], instructblip.streams, counts)
    assert {s.layer for s in sites} == set(crossing)
    assert {s.position for s in sites} == set(range(ARCH["queries"]))
    with pytest.raises(NoticeError, match="layer 1 of qformer has no cross_attn"):
        expand_sites(["qformer.1.cross_attn.head0"], instructblip.streams, counts)


def test_pairs_whose_prompts_differ_in_qformer_wordpieces_are_refused(instructblip, tmp_path):
    words = ["red", "blue", "green", "teal", "gray", "sunflowers", "yellow", "brown"]
    prompts = [f"is the shape {w}?" for w in words]
    lengths = {p: (instructblip.token_length(p), instructblip.instruction_length(p)) for p in prompts}
    clash = next((a, b) for a in prompts for b in prompts
                 if lengths[a][0] == lengths[b][0] and lengths[a][1] != lengths[b][1])
    image = helpers.shape_image(32)
    with pytest.raises(NoticeError, match="wordpieces in the Q-Former"):
        instructblip.runs_for(image, image, *clash)
    batches = instructblip.batches_by_length(list(clash), batch_size=8)
    assert sorted(map(len, batches)) == [1, 1]  # never padded together
    image_file = tmp_path / "red.png"
    image.save(image_file)
    good = Pair("good", "colors", "text_str", str(image_file), str(image_file), "is the shape red?", "is the shape blue?",
                "yes", "no")
    bad = dataclasses.replace(good, id="clash", clean_prompt=clash[0], corrupt_prompt=clash[1])
    with pytest.raises(NoticeError, match=r"pair clash \(row 2\): its clean and corrupt prompts have lengths"):
        patch_pairs(instructblip, [good, bad], ["lm.0.layer@last"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("**/*.parquet"))  # refused before the first shard


def _config_folder(folder, text_config: dict):
    from transformers import InstructBlipConfig

    InstructBlipConfig(text_config=text_config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("text_config, message", [
    (dict(model_type="t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16),
     "its language model T5ForConditionalGeneration is not supported; notice runs InstructBlipForConditionalGeneration "
     "with OPTForCausalLM or LlamaForCausalLM"),
    (dict(model_type="opt", do_layer_norm_before=False), "normalizes after each sublayer")])
def test_an_unsupported_language_model_is_one_line_before_any_weights(tmp_path, text_config, message):
    from notice.cli import app

    folder = _config_folder(tmp_path, text_config)  # no weights: the refusal reads the config alone
    result = CliRunner().invoke(app, ["info", "--model", str(folder)])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) <= 2  # one line (the terminal may wrap it)
    assert json.loads((folder / "config.json").read_text())["text_config"]["model_type"] == text_config["model_type"]


def test_blip2_in_bfloat16_with_its_qformer_kept_in_float32_patches(tmp_path):
    """transformers may keep BLIP-2's Q-Former in float32 beside a bfloat16 model (`_keep_in_fp32_modules`)."""
    folder = helpers.save_qformer(tmp_path / "blip2", "blip-2")
    adapter = load_model(str(folder), dtype="bfloat16")
    adapter.model.qformer.float()
    assert adapter.dtype == torch.bfloat16
    pair = helpers.make_pairs(tmp_path, ARCH["image_size"])["image_smp"]
    sites = ["vision.1.layer@all", "qformer.*.cross_attn.head0@0", "projector.0.layer@all", "lm.1.self_attn@last"]
    table = patch_pair(adapter, pair, sites)  # the engine's sanity checks run at bfloat16 tolerance
    assert table["ld"].notna().all() and len(table) == 5


def test_the_pipeline_runs_on_instructblip_from_pairs_to_report(instructblip, tmp_path):
    """pairs under the LM's tokenizer, a Q-Former cross-attention head sweep, head functions on the layers
    that cross-attend, and the report over both."""
    from notice.analysis.head_functions import read_head_functions
    from notice.cli import app
    from notice.store import load_results

    folder = instructblip.name

    def notice(*args: str) -> None:
        result = CliRunner().invoke(app, [*args, "--model", folder])
        assert result.exit_code == 0, result.output
    notice("pairs", "easyvqa-color", "--split", "test", "--limit", "2", "--corruptions", "image_smp",
           "--out", str(tmp_path / "pairs.parquet"))
    notice("patch", str(tmp_path / "pairs.parquet"), "--sites", "qformer.*.cross_attn.head*@all,lm.*.mlp@last",
           "--limit", "1", "--out", str(tmp_path / "run"))
    notice("head-functions", str(tmp_path / "pairs.parquet"), "--limit", "2", "--out", str(tmp_path / "heads"))
    table = load_results(tmp_path / "run")
    crossing = set(instructblip.streams["qformer"].layers_of["cross_attn"])
    assert set(table[table["stream"] == "qformer"]["layer"]) == crossing
    functions = read_head_functions(tmp_path / "heads")
    assert functions is not None and set(functions.table["layer"]) == crossing
    assert functions.facts["stream"] == "qformer" and functions.facts["component"] == "cross_attn"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"),
                                      "--pairs", str(tmp_path / "pairs.parquet"), "--head-functions", str(tmp_path / "heads")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").is_file()
