"""The command line on a LLaVA checkpoint: `info` and `ask` work as on BLIP."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import helpers
from notice.cli import app

runner = CliRunner()


def test_info_lists_llava_streams_and_site_names(tiny_llava_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_llava_dir)])
    assert result.exit_code == 0, result.output
    for expected in ("llava", "projector", "lm.{0..2}.self_attn.head{0..5}@{token}"):
        assert expected in result.output


def test_info_json_counts_image_tokens_and_query_heads(tiny_llava_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_llava_dir), "--json"])
    facts = json.loads(result.stdout)
    assert facts["family"] == "llava"
    assert facts["image_tokens"] == (helpers.TINY_LLAVA["image_size"] // helpers.TINY_LLAVA["patch_size"]) ** 2
    assert facts["streams"]["lm"]["heads"] == helpers.TINY_LLAVA["text_heads"]
    assert "grouped-query" in facts["streams"]["lm"]["description"]


def test_ask_prints_the_greedy_answer_and_candidates(tiny_llava_dir, tmp_path):
    image = tmp_path / "shape.png"
    helpers.shape_image(32).save(image)
    result = runner.invoke(app, ["ask", str(image), "what color is the shape?", "--model", str(tiny_llava_dir),
                                 "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "top candidates" in result.output
    assert result.output.count("0.") >= 3


def test_train_default_refuses_an_unknown_family(tmp_path):
    result = runner.invoke(app, ["train-default", "--family", "gpt", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown family" in result.stderr
