"""The engine on BLIP beyond the contract suite: the embedded architecture and model, batch sizing,
site errors, grouping, and sanity checks that bite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from notice.errors import NoticeError
from notice.models.blip import BlipAdapter
from notice.patching import engine
from notice.patching.engine import SanityCheckError, patch_pair
from notice.patching.naive import naive_patch_pair
from notice.patching.sites import expand_sites, parse_site
from helpers import assert_same_table, every_site_kind, make_pairs

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
def test_engine_equals_naive_on_the_embedded_architecture(easyvqa_arch, easyvqa_pairs, corruption, direction):
    pair = easyvqa_pairs[corruption]
    sites = every_site_kind(easyvqa_arch, pair)
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
        sites = every_site_kind(default_blip, pair)
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

    def ignores_the_source(receiving, source, batch, start=0, **context):  # never takes the source's values
        return receiving.acts[(batch.stream, batch.layer)]["layer"].expand(len(batch), -1, -1).clone()

    monkeypatch.setattr(tiny, "patched_layer", ignores_the_source)
    with pytest.raises(SanityCheckError, match="should reproduce the clean run"):
        patch_pair(tiny, pair, ["text.*.mlp"])
    table = patch_pair(tiny, pair, ["text.*.mlp"], checks=False)  # unchecked, the broken numbers go through
    assert len(table) > 0


def test_sanity_check_raises_when_a_layer_is_skipped(tiny, tiny_pairs, monkeypatch):
    pair = tiny_pairs["text_str"]
    run_stream = tiny._run

    def skips_last_layer(stream, start, hidden, memory):
        if stream == "text" and start == 1:
            return hidden  # forgets text layer 1
        return run_stream(stream, start, hidden, memory)

    monkeypatch.setattr(tiny, "_run", skips_last_layer)
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


def test_cells_whose_patch_changes_nothing_take_the_receiving_logits_without_a_forward(tiny_llava, tmp_path,
                                                                                       monkeypatch):
    """A text pair in a causal LM: every position before the swapped word holds the same values in both
    runs, so those cells cost no forward; the table still equals one full forward per cell."""
    pair = make_pairs(tmp_path, helpers.TINY_LLAVA["image_size"])["text_str"]
    clean, corrupt = engine.pair_runs(tiny_llava, pair)
    first_difference = int((clean.inputs.input_ids[0] != corrupt.inputs.input_ids[0]).nonzero()[0, 0])
    sites = ["lm.*.layer", "lm.*.self_attn.head*"]
    cells = expand_sites(sites, tiny_llava.streams, tiny_llava.num_positions(clean))
    computed = []
    forward = tiny_llava.patched_logits
    monkeypatch.setattr(tiny_llava, "patched_logits", lambda receiving, source, batches: (
        computed.extend(int(p) for b in batches for p in b.positions[:, 0]), forward(receiving, source, batches))[1])
    table = patch_pair(tiny_llava, pair, sites, checks=False)
    assert first_difference > 0 and len(computed) == sum(int(s.position) >= first_difference for s in cells)
    assert min(computed) == first_difference
    monkeypatch.undo()
    assert_same_table(table, naive_patch_pair(tiny_llava, pair, sites))


def test_neighbouring_positions_of_a_causal_lm_share_a_group_up_to_min_rows():
    sites = [parse_site(f"lm.{layer}.layer@{position}") for position in range(10) for layer in range(2)]
    groups = engine.plan(sites, ["lm"], {"lm"}, min_rows=5)
    assert [len(g.cells) for g in groups] == [6, 6, 6, 2]  # positions 0-2, 3-5, 6-8, 9
    for group in groups:  # each layer's cells contiguous, as make_batches needs
        assert [sites[i].layer for i in group.cells] == sorted(sites[i].layer for i in group.cells)
    assert sorted(i for g in groups for i in g.cells) == list(range(len(sites)))
    assert [len(g.cells) for g in engine.plan(sites, ["lm"], {"lm"}, min_rows=1)] == [2] * 10
    assert [len(g.cells) for g in engine.plan(sites, ["lm"])] == [10, 10]  # not a causal LM: by layer
