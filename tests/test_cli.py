"""The command line: verbs, their output, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import helpers
from notice.cli import app

runner = CliRunner()


def test_info_lists_streams_heads_and_site_names(tiny_blip_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_blip_dir)])
    assert result.exit_code == 0, result.output
    for expected in ("vision", "text", "decoder", "cross_attn", "text.{0..1}.cross_attn.head{0..3}@{token}"):
        assert expected in result.output


def test_info_json_is_machine_readable(tiny_blip_dir):
    import json

    result = runner.invoke(app, ["info", "--model", str(tiny_blip_dir), "--json"])
    facts = json.loads(result.stdout)
    assert facts["streams"]["text"]["heads"] == helpers.TINY_BLIP["text_heads"]
    assert facts["image_tokens"] == 17


def test_ask_prints_answer_and_candidates(tiny_blip_dir, tmp_path):
    image = tmp_path / "shape.png"
    helpers.shape_image(32).save(image)
    result = runner.invoke(app, ["ask", str(image), "what color is the shape?", "--model", str(tiny_blip_dir),
                                 "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "top candidates" in result.output
    assert result.output.count("0.") >= 3  # three probabilities


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in result.output
    return text


def test_missing_image_is_named(tiny_blip_dir, tmp_path):
    missing = tmp_path / "nope.png"
    text = _one_line_error(runner.invoke(app, ["ask", str(missing), "is it red?", "--model", str(tiny_blip_dir)]))
    assert "nope.png" in text


def test_unreadable_image_is_named(tiny_blip_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    text = _one_line_error(runner.invoke(app, ["ask", str(broken), "is it red?", "--model", str(tiny_blip_dir)]))
    assert "broken.png" in text and "PNG or JPEG" in text


def test_empty_question_is_refused(tiny_blip_dir, tmp_path):
    image = tmp_path / "shape.png"
    helpers.shape_image(32).save(image)
    _one_line_error(runner.invoke(app, ["ask", str(image), "   ", "--model", str(tiny_blip_dir)]))


@pytest.mark.parametrize("model", ["not-a-model-name", "someone/unreachable-checkpoint"])
def test_unknown_model_names_and_offline_hub_ids_are_refused(model, tmp_path):
    image = tmp_path / "shape.png"
    helpers.shape_image(32).save(image)
    text = _one_line_error(runner.invoke(app, ["ask", str(image), "is it red?", "--model", model]))
    assert model in text
    text = _one_line_error(runner.invoke(app, ["info", "--model", model]))
    assert model in text


def test_bad_dtype_is_refused(tiny_blip_dir, tmp_path):
    image = tmp_path / "shape.png"
    helpers.shape_image(32).save(image)
    text = _one_line_error(runner.invoke(app, ["ask", str(image), "is it red?", "--model", str(tiny_blip_dir),
                                               "--dtype", "float8"]))
    assert "float8" in text
