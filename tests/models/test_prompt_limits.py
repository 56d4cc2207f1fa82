"""What a model can read, known before its weights load: the prompt budget every boundary check uses."""

from __future__ import annotations

import shutil

import pytest

from notice.models import load_model, prompt_budget, resolve_model

QUESTIONS = ["what color is the shape?", "is the shape red or blue?", "is this person feeling happy or surprised?"]


@pytest.mark.parametrize("model", ["tiny_blip", "tiny_llava"])
def test_budget_from_the_checkpoint_equals_the_loaded_adapters(model, request):
    adapter = request.getfixturevalue(model)
    budget = prompt_budget(str(request.getfixturevalue(f"{model}_dir")))
    assert budget.limit == adapter.max_prompt_tokens
    assert [budget.length(q) for q in QUESTIONS] == [adapter.token_length(q) for q in QUESTIONS]


def test_the_embedded_blip_reads_32_positions_and_says_which_prompt_is_longer():
    budget = prompt_budget("easyvqa-blip")
    assert budget.limit == 32
    assert budget.excess("what color is the shape?") is None
    length = budget.excess("is this person feeling happy or surprised?")  # spelled letter by letter: 33
    assert length == 33 and "33 tokens, more than the 32 that easyvqa-blip reads" in budget.describe("q", length)


def test_a_downloaded_hub_id_loads_from_the_cache_when_the_hub_is_unreachable(tiny_blip_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    revision = "0" * 40  # the hub cache's layout: refs name a snapshot folder of the repository's files
    repo = tmp_path / "models--someone--tiny-blip"
    shutil.copytree(tiny_blip_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_model("someone/tiny-blip") == str(repo / "snapshots" / revision)
    adapter = load_model("someone/tiny-blip")
    assert adapter.name == "someone/tiny-blip" and adapter.max_prompt_tokens == 512
