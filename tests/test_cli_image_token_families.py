"""Every command on saved tiny checkpoints of the image-token families beyond LLaVA (Gemma 3,
LLaVA-OneVision, LLaVA-NeXT): ask, pairs under the model's tokenizer, select, an answer-token head sweep with an
image-token sweep, head functions on easy-VQA's object masks, and the report."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

import helpers
from notice.cli import app

runner = CliRunner()
SAVE = {"gemma3": lambda folder: helpers.save_gemma3(folder, helpers.TINY_GEMMA3),
        "llava_onevision": helpers.save_llava_onevision, "llava_next": helpers.save_llava_next}


@pytest.mark.parametrize("family", list(SAVE))
def test_every_command_runs_on_a_saved_checkpoint(family, tmp_path):
    folder = SAVE[family](tmp_path / family)
    model = ["--model", str(folder)]

    def ok(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    image = tmp_path / "shape.png"
    helpers.shape_image(64).save(image)
    assert "top candidates" in ok("ask", str(image), "what color is the shape?", *model)
    info = ok("info", *model)
    assert family in info and "image tokens" in info and "lm.{0.." in info
    ok("pairs", "easyvqa-color", "--split", "test", "--limit", "2", "--out", str(tmp_path / "pairs.parquet"), *model)
    selected = runner.invoke(app, ["select", str(tmp_path / "pairs.parquet"), "--out",
                                   str(tmp_path / "selected.parquet"), *model])
    # a random model answers few pairs right: selection runs every pair and says why each was dropped
    assert selected.exit_code == 0 or "no pair passed selection" in selected.output, selected.output
    assert re.search(r"kept \d+ of 1\d pairs", selected.output)
    ok("patch", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "run"), "--limit", "2", *model,
       "--sites", "lm.*.self_attn.head*@answer,projector.0.layer")
    ok("head-functions", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "heads"), "--limit", "2", *model)
    ok("report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--pairs", str(tmp_path / "pairs.parquet"),
       "--head-functions", str(tmp_path / "heads"))
    assert (tmp_path / "report" / "index.html").is_file()
