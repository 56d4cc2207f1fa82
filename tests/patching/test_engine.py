"""The engine gives naive.py's numbers on every site kind, pair kind and direction; its checks bite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import helpers
from notice.corrupt.noise import noise_spec
from notice.errors import NoticeError
from notice.models.blip import BlipAdapter
from notice.pairs import Pair
from notice.patching import engine
from notice.patching.engine import SanityCheckError, patch_pair
from notice.patching.naive import naive_patch_pair
from notice.patching.sites import expand_sites

METRICS = ["ld", "normalized_effect", "p_correct", "delta_p", "kl"]
TOLERANCE = 1e-4  # fp32, absolute and relative


def make_pairs(folder: Path, size: int) -> dict[str, Pair]:
    """One pair of each corruption kind, with real image files."""
    red, blue = folder / "red.png", folder / "blue.png"
    helpers.shape_image(size, (255, 0, 0), "circle", box=(size // 4,) * 2 + (3 * size // 4,) * 2).save(red)
    helpers.shape_image(size, (0, 0, 255), "triangle", box=(size // 8,) * 2 + (7 * size // 8,) * 2).save(blue)
    question = "what color is the shape?"
    return {
        "image_smp": Pair("smp", "colors", "image_smp", str(red), str(blue), question, question, "red", "blue"),
        "text_str": Pair("str", "colors", "text_str", str(red), str(red), "is the shape red?", "is the shape blue?",
                         "yes", "no"),
        "image_noise": Pair("inoise", "colors", "image_noise", str(red), str(red), question, question, "red", "blue",
                            {"noise": noise_spec("vision", "all", seed=3)}),
        "text_noise": Pair("tnoise", "colors", "text_noise", str(red), str(red), question, question, "red", "blue",
                           {"noise": noise_spec("text", [4, 5], seed=4)}),
    }


def every_site_kind(adapter, prompt: str) -> list[str]:
    """Each stream × component × (whole, first head, last head): at the first layer's first position,
    at the last layer's last position, and at every position at once."""
    positions = adapter.num_positions(prompt)
    sites = []
    for stream, facts in adapter.streams.items():
        last_layer, last_position = facts.layers - 1, positions[stream] - 1
        for component in facts.components:
            heads = [""] + ([".head0", f".head{facts.heads - 1}"] if component.endswith("attn") else [])
            for head in heads:
                sites += [f"{stream}.0.{component}{head}@0", f"{stream}.{last_layer}.{component}{head}@{last_position}",
                          f"{stream}.{last_layer // 2}.{component}{head}@all"]
    return sites


def assert_same_table(fast: pd.DataFrame, slow: pd.DataFrame) -> None:
    assert list(fast.columns) == list(slow.columns)
    assert fast["site"].tolist() == slow["site"].tolist()
    plain = [c for c in fast.columns if c not in METRICS]
    pd.testing.assert_frame_equal(fast[plain], slow[plain])
    for metric in METRICS:
        np.testing.assert_allclose(fast[metric], slow[metric], rtol=TOLERANCE, atol=TOLERANCE, err_msg=metric)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    arch = helpers.TINY_BLIP
    model = helpers.sensitize(helpers.blip_model(arch))
    return BlipAdapter(model, helpers.blip_processor(arch["image_size"]), "tiny")


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), helpers.TINY_BLIP["image_size"])


@pytest.fixture(scope="module")
def easyvqa_arch(tmp_path_factory):
    return helpers.easyvqa_arch_blip(tmp_path_factory.mktemp("easyvqa-arch"))


@pytest.fixture(scope="module")
def easyvqa_pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs64"), 64)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", ["image_smp", "text_str", "image_noise", "text_noise"])
def test_engine_equals_naive_on_every_site_kind_tiny_blip(tiny, tiny_pairs, corruption, direction):
    pair = tiny_pairs[corruption]
    sites = every_site_kind(tiny, pair.clean_prompt)
    fast = patch_pair(tiny, pair, sites, direction, batch_size=7)  # 7: batches that split groups unevenly
    slow = naive_patch_pair(tiny, pair, sites, direction)
    assert len(fast) == len(set(sites)) and fast["flags"].iloc[0] == ""  # the pair separates its answers
    assert_same_table(fast, slow)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", ["image_smp", "text_str", "image_noise", "text_noise"])
def test_engine_equals_naive_on_the_embedded_architecture(easyvqa_arch, easyvqa_pairs, corruption, direction):
    pair = easyvqa_pairs[corruption]
    sites = every_site_kind(easyvqa_arch, pair.clean_prompt)
    assert_same_table(patch_pair(easyvqa_arch, pair, sites, direction),
                      naive_patch_pair(easyvqa_arch, pair, sites, direction))


def test_whole_text_sweep_in_batches_equals_naive(tiny, tiny_pairs):
    """Every text site (all layers, heads, positions) at once, in automatic batch sizes."""
    pair = tiny_pairs["image_smp"]
    sites = ["text.*.cross_attn.head*", "decoder.*.mlp"]
    assert_same_table(patch_pair(tiny, pair, sites), naive_patch_pair(tiny, pair, sites))


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "src/notice/assets/easyvqa-blip").is_dir(),
                    reason="the embedded model's weights are not in this checkout")
def test_engine_equals_naive_on_the_embedded_model(default_blip, easyvqa_pairs):
    for corruption in ("image_smp", "text_str"):
        pair = easyvqa_pairs[corruption]
        sites = every_site_kind(default_blip, pair.clean_prompt)
        assert_same_table(patch_pair(default_blip, pair, sites), naive_patch_pair(default_blip, pair, sites))


def test_full_patches_restore_and_empty_patches_keep(tiny, tiny_pairs):
    """The metric scale: the last text layer's whole output restores the clean LD (normalized 1, KL 0)."""
    pair = tiny_pairs["image_smp"]
    last = tiny.streams["text"].layers - 1
    table = patch_pair(tiny, pair, [f"text.{last}.layer@all", "vision.0.layer@all"])
    np.testing.assert_allclose(table["normalized_effect"], 1.0, atol=1e-4)
    np.testing.assert_allclose(table["kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["ld"], table["ld_clean"], atol=1e-4)


def test_sanity_check_raises_when_the_patch_is_broken(tiny, tiny_pairs, monkeypatch):
    pair = tiny_pairs["image_smp"]

    def ignores_the_source(receiving, source, batch):  # a patch that never takes the source's values
        return receiving.acts[(batch.stream, batch.layer)]["layer"].expand(len(batch), -1, -1).clone()

    monkeypatch.setattr(tiny, "_patched_layer", ignores_the_source)
    with pytest.raises(SanityCheckError, match="should reproduce the clean run"):
        patch_pair(tiny, pair, ["text.*.mlp"])
    table = patch_pair(tiny, pair, ["text.*.mlp"], checks=False)  # unchecked, the broken numbers go through
    assert len(table) > 0


def test_sanity_check_raises_when_a_layer_is_skipped(tiny, tiny_pairs, monkeypatch):
    pair = tiny_pairs["text_str"]
    run_stream = tiny._run_stream

    def skips_last_layer(stream, start, hidden, kv=None, memory=None):
        if stream == "text" and start == 1:
            return hidden  # forgets text layer 1
        return run_stream(stream, start, hidden, kv=kv, memory=memory)

    monkeypatch.setattr(tiny, "_run_stream", skips_last_layer)
    with pytest.raises(SanityCheckError, match="patching nothing at text"):
        patch_pair(tiny, pair, ["text.0.mlp"], direction="noise")


@pytest.mark.parametrize("pattern, message", [
    ("pixels.0.mlp", "valid streams are vision, text, decoder"),
    ("text.7.mlp", "text has layers 0..1"),
    ("text.0.feedforward", "text has layer, self_attn, cross_attn, mlp"),
    ("vision.0.self_attn.head9", "vision has heads 0..3"),
    ("text.0.mlp@40", "text has positions 0..7"),
    ("text.0.mlp.head1", "heads exist only on attention components"),
    ("text-0-mlp", "write stream.layer.component"),
    ("text.0.mlp@answer", "the text stream has no answer position; the answer is read in decoder"),
])
def test_bad_site_names_give_one_line_errors_with_valid_choices(tiny, tiny_pairs, pattern, message):
    with pytest.raises(NoticeError, match=message) as info:
        patch_pair(tiny, tiny_pairs["image_smp"], [pattern])
    assert "\n" not in str(info.value)


def test_last_and_answer_positions_follow_each_input(tiny):
    counts = {"text": 5, "vision": 17, "decoder": 1}
    assert {s.name for s in expand_sites(["text.1.mlp@last", "decoder.*.layer@answer"], tiny.streams, counts)} == {
        "text.1.mlp@4", "decoder.0.layer@0", "decoder.1.layer@0"}
    longer = expand_sites(["text.1.mlp@last"], tiny.streams, dict(counts, text=9))
    assert [s.name for s in longer] == ["text.1.mlp@8"]
    anywhere = expand_sites(["*.0.layer@answer"], tiny.streams, counts)  # only streams that read the answer
    assert [s.name for s in anywhere] == ["decoder.0.layer@0"]


def test_cells_of_one_layer_share_a_forward_whatever_their_target(tiny):
    sites = expand_sites(["text.*.cross_attn.head*", "text.*.mlp@all", "decoder.1.layer"], tiny.streams,
                         {"text": 5, "vision": 17, "decoder": 1})
    groups = engine.plan(sites, list(tiny.streams))
    assert sum(len(g.cells) for g in groups) == len(sites)
    assert [(g.stream, g.layers, len(g.cells)) for g in groups] == [("text", [0], 4 * 5 + 1), ("text", [1], 4 * 5 + 1),
                                                                      ("decoder", [1], 1)]
    for group in groups:
        assert {(sites[i].stream, sites[i].layer) for i in group.cells} == {(group.stream, group.layers[0])}


def test_batch_size_follows_max_memory(tiny, tiny_pairs):
    pair = tiny_pairs["image_smp"]
    clean, corrupt = engine.pair_runs(tiny, pair)
    traces = tiny.trace(clean, {"text"}), tiny.trace(corrupt, {"text"})
    small = engine.batch_size_for(tiny, "text", *traces, engine.parse_memory("40MB"))
    large = engine.batch_size_for(tiny, "vision", *traces, engine.parse_memory("8GB"))
    assert 1 <= small < large <= engine.MAX_BATCH
    with pytest.raises(NoticeError, match="too small"):
        engine.batch_size_for(tiny, "text", *traces, engine.parse_memory("1MB"))
    assert engine.parse_memory("1.5GB") == int(1.5 * 2**30)
    with pytest.raises(NoticeError, match="bad memory size"):
        engine.parse_memory("lots")


def test_bfloat16_engine_stays_close_to_float32(tiny_blip_dir, tiny_pairs):
    from notice.models import load_model

    fp32 = BlipAdapter(helpers.sensitize(load_model(str(tiny_blip_dir)).model), load_model(str(tiny_blip_dir)).processor, "a")
    bf16 = BlipAdapter(helpers.sensitize(load_model(str(tiny_blip_dir)).model).to(torch.bfloat16),
                       fp32.processor, "b")
    pair = tiny_pairs["image_smp"]
    sites = ["text.*.cross_attn.head*@all", "text.*.mlp"]
    low, high = patch_pair(bf16, pair, sites), patch_pair(fp32, pair, sites)
    assert np.isfinite(low["ld"]).all()
    np.testing.assert_allclose(low["ld"], high["ld"], atol=0.15 * max(1.0, high["ld"].abs().max()))
