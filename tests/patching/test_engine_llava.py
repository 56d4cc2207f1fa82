"""The patching engine runs unchanged through the LLaVA adapter and gives naive.py's numbers
(one full forward per cell) on every site kind, pair kind and direction."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from notice.corrupt.noise import noise_spec
from notice.pairs import write_pairs
from notice.patching.engine import patch_pair
from notice.patching.naive import naive_patch_pair
from notice.patching.sites import expand_sites
from test_engine import assert_same_table, every_site_kind, make_pairs

import helpers


@pytest.fixture(scope="module")
def llava_pairs(tmp_path_factory, tiny_llava):
    pairs = make_pairs(tmp_path_factory.mktemp("llava-pairs"), helpers.TINY_LLAVA["image_size"])
    noise = pairs["text_noise"]
    words = [1, 2]  # the question's first two tokens, tokenized alone after <s> (as pairs store them)
    mapped = tiny_llava.prompt_positions(noise.clean_prompt, words)
    alone = tiny_llava.tokenizer.convert_ids_to_tokens(tiny_llava.tokenizer(noise.clean_prompt)["input_ids"])
    in_prompt = tiny_llava.tokenize(noise.clean_prompt)
    # the same characters, however the template's context splits them into tokens
    assert "".join(in_prompt[i] for i in mapped).strip("▁") == "".join(alone[i] for i in words).strip("▁")
    assert set(mapped) <= set(tiny_llava.question_positions(noise.clean_prompt))
    pairs["text_noise"] = dataclasses.replace(noise, metadata={"noise": noise_spec("text", words, seed=4)})
    return pairs


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", ["image_smp", "text_str", "image_noise", "text_noise"])
def test_engine_equals_naive_on_every_llava_site_kind(tiny_llava, llava_pairs, corruption, direction):
    pair = llava_pairs[corruption]
    sites = every_site_kind(tiny_llava, pair.clean_prompt)
    ids = tiny_llava.prepare([helpers.shape_image(32)], [pair.clean_prompt]).input_ids[0]
    image = tiny_llava.image_positions(ids)
    sites += [f"lm.1.self_attn.head*@{image.start + 3}", f"lm.1.mlp@{tiny_llava.answer_position(ids) - 2}"]
    fast = patch_pair(tiny_llava, pair, sites, direction, batch_size=5)  # 5: batches that split groups unevenly
    slow = naive_patch_pair(tiny_llava, pair, sites, direction)
    assert len(fast) == len(expand_sites(sites, tiny_llava.streams, tiny_llava.num_positions(pair.clean_prompt)))
    assert_same_table(fast, slow)
    assert fast["ld"].std() > 1e-3  # the cells differ: the comparison is not between constants


def test_whole_lm_head_sweep_and_image_token_sweep_equal_naive(tiny_llava, llava_pairs):
    pair = llava_pairs["image_smp"]
    ids = tiny_llava.prepare([helpers.shape_image(32)], [pair.clean_prompt]).input_ids[0]
    image = tiny_llava.image_positions(ids)
    sites = [f"lm.*.self_attn.head*@{tiny_llava.answer_position(ids)}", "projector.0.layer@*"]
    sites += [f"lm.1.self_attn@{p}" for p in image]
    assert_same_table(patch_pair(tiny_llava, pair, sites), naive_patch_pair(tiny_llava, pair, sites))


def test_notice_patch_runs_on_llava_with_image_and_text_sites(tiny_llava_dir, tiny_llava, llava_pairs, tmp_path):
    from notice.cli import app
    from notice.store import load_results

    pairs_file = write_pairs([llava_pairs["image_smp"], llava_pairs["text_str"]], tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    # no position: every position of each pair's own prompt (the two prompts differ in length)
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(tiny_llava_dir), "--out", str(out),
                                      "--sites", "lm.2.self_attn.head*,projector.0.layer@*,lm.*.mlp@last"])
    assert result.exit_code == 0, result.output
    table = load_results(out)
    assert set(table["stream"]) == {"lm", "projector"}
    assert table["token"].str.contains("image").any()  # image-token sites are labelled as such
    mlp = table[table["component"] == "mlp"]
    for pair in (llava_pairs["image_smp"], llava_pairs["text_str"]):  # @last: each prompt's own answer position
        rows = mlp[mlp["pair_id"] == pair.id]
        assert sorted(rows["layer"]) == list(range(tiny_llava.streams["lm"].layers))
        assert set(rows["position"]) == {tiny_llava.token_length(pair.clean_prompt) - 1}
    lm_heads = table[(table["stream"] == "lm") & (table["component"] == "self_attn")]
    lengths = {pair_id: len(rows) for pair_id, rows in lm_heads.groupby("pair_id")}
    assert {pair_id: n // 6 for pair_id, n in lengths.items()} == {
        p.id: tiny_llava.token_length(p.clean_prompt) for p in (llava_pairs["image_smp"], llava_pairs["text_str"])}
