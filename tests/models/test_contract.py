"""The adapter contract, checked the same way on every family (tests/models/families.py).

Engine = one full forward per cell with a hook (naive.py), to 1e-4, on every site kind, both
directions and every pair kind; the staged forward = transformers' own; positions, answers,
attention maps against eager attention, hook points, noise runs, and `notice info`/`patch`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import pytest
import torch
from typer.testing import CliRunner

import helpers
from families import FAMILIES
from notice.io import load_image
from notice.models import load_model
from notice.models.base import ModelAdapter, PatchBatch, Run
from notice.patching.engine import patch_pair
from notice.patching.inputs import noisy_run, pair_runs
from notice.patching.naive import hooked, naive_patch_pair
from notice.patching.sites import expand_sites, parse_site, site_catalogue

QUESTION = "what color is the shape?"
CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    spec = FAMILIES[request.param]
    folder = spec.save(tmp_path_factory.mktemp(f"tiny-{spec.name}"))
    pairs = helpers.make_pairs(tmp_path_factory.mktemp(f"pairs-{spec.name}"), spec.image_size)
    return spec, folder, load_model(str(folder)), pairs


def _inputs(adapter, seeds=(0,)):
    images = [helpers.shape_image(64) if s == 0 else helpers.noise_image(64, s) for s in seeds]
    return images, adapter.prepare(images, [QUESTION] * len(images))


# ---------------------------------------------------------------------------- facts
def test_adapter_declares_its_streams_maps_and_blocks(family):
    spec, folder, adapter, _ = family
    assert isinstance(adapter, ModelAdapter) and adapter.family == spec.name
    assert set(adapter.stream_maps) == set(adapter.streams)
    for name, facts in adapter.streams.items():
        assert facts.name == name and "layer" in facts.components
        if not adapter.stream_maps[name].single:
            assert len(adapter.blocks[name]) == facts.layers
            assert set(adapter.stream_maps[name].writes) == set(facts.components) - {"layer"}
    assert sum(f.reads_answer for f in adapter.streams.values()) == 1
    described = adapter.describe()
    assert described["family"] == spec.name and set(described["streams"]) == set(adapter.streams)
    # pooling may take fewer image tokens than patches
    assert described["image_tokens"] == adapter.image_token_count() > 0 and min(described["patch_grid"]) > 0


def test_notice_info_lists_streams_and_sites(family):
    from notice.cli import app

    _, folder, adapter, _ = family
    result = CliRunner().invoke(app, ["info", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    for stream in adapter.streams:
        assert stream in result.output
    assert all(line in result.output for line in site_catalogue(adapter.streams)[:2])


# --------------------------------------------------------------------------- answers
def test_staged_forward_equals_the_models_own(family):
    spec, _, adapter, _ = family
    _, inputs = _inputs(adapter, seeds=(0, 1))
    with torch.no_grad():
        theirs = spec.native_logits(adapter, inputs)
    ours = adapter.run_logits(Run(inputs))
    torch.testing.assert_close(ours, theirs.float(), **CLOSE)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # the image matters to the answer


def test_answer_logits_batch_share_images_and_never_mix_lengths(family):
    _, _, adapter, _ = family
    questions = ["is it red?", "what color is the big shape?", "is it blue?", QUESTION]
    images = [helpers.noise_image(64, s) for s in range(2)]
    for batch in adapter.batches_by_length(questions, batch_size=8):
        assert len({adapter.token_length(questions[i]) for i in batch}) == 1
    owner = [0, 1, 1, 0]
    shared = adapter.answer_logits(images, questions, image_index=owner)
    alone = torch.cat([adapter.answer_logits([images[o]], [q]) for o, q in zip(owner, questions)])
    torch.testing.assert_close(shared, alone, **CLOSE)


def test_greedy_generation_starts_with_the_logit_argmax(family):
    _, _, adapter, _ = family
    images = [helpers.noise_image(64, s) for s in range(2)]
    questions = ["is this red?", "what shape is it?"]
    first = [adapter.tokenizer.decode([i], skip_special_tokens=True)
             for i in adapter.answer_logits(images, questions).argmax(1).tolist()]
    answers = adapter.generate(images, questions, max_new_tokens=1)

    def bare(text: str) -> str:  # decoding one token keeps a wordpiece's "##" and a newline; answers drop them
        return text.replace("##", "").replace(" ", "").strip()
    assert [bare(a) for a in answers] == [bare(f) for f in first]


def test_answers_scored_by_first_token_or_whole_sequence(family):
    _, _, adapter, _ = family
    image, word = helpers.noise_image(64, 2), "sunflowers"  # several tokens in every test vocabulary
    pieces = adapter.answer_token_ids(word)
    assert len(pieces) > 1
    first = adapter.score_answers([image], [QUESTION], [word], scoring="first_token")[0, 0]
    sequence = adapter.score_answers([image], [QUESTION], [word], scoring="sequence")[0, 0]
    logp = torch.log_softmax(adapter.answer_logits([image], [QUESTION])[0], -1)
    torch.testing.assert_close(first, logp[pieces[0]], **CLOSE)
    assert sequence < first  # each further piece's log-probability can only lower it


# ------------------------------------------------------------------------- positions
def test_positions_come_from_the_prepared_input(family):
    _, _, adapter, _ = family
    images, inputs = _inputs(adapter)
    run = Run(inputs)
    counts = adapter.num_positions(run)
    labels = adapter.position_labels(run)
    assert set(counts) == set(adapter.streams) == set(labels)
    assert all(len(labels[s]) == counts[s] for s in counts)
    assert inputs.input_ids.shape[1] in counts.values()
    if adapter.image_key(images[0]) is None:  # every image takes the same positions: token_length counts them
        assert adapter.token_length(QUESTION) == inputs.input_ids.shape[1]
    answer = next(s for s, f in adapter.streams.items() if f.reads_answer)
    sites = expand_sites([f"{answer}.0.layer@answer", f"{answer}.0.layer@last"], adapter.streams, counts)
    assert [s.position for s in sites] == [counts[answer] - 1]


def test_hook_points_hold_every_position_and_heads_are_slices(family):
    _, _, adapter, pairs = family
    clean, _ = pair_runs(adapter, pairs["image_smp"])
    counts = adapter.num_positions(clean)
    for stream, facts in adapter.streams.items():
        for component in facts.components:
            layer = max(l for l in range(facts.layers) if facts.has(component, l))
            site = parse_site(f"{stream}.{layer}.{component}" + (".head0" if component.endswith("attn") else ""))
            seen = []
            with hooked(adapter, site, lambda t, seen=seen: seen.append(tuple(t.shape)) or t, clean):
                adapter.run_logits(clean)
            assert len(seen) == 1 and seen[0][:2] == (1, facts.rows(component, counts[stream])), (site, seen)
            columns = adapter.site_columns(site)
            if site.head is not None:
                assert columns.stop - columns.start == facts.head_dim and columns.stop <= seen[0][2]


# -------------------------------------------------------------------------- patching
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("corruption", ["image_smp", "text_str", "image_noise", "text_noise"])
def test_engine_equals_naive_on_every_site_kind(family, corruption, direction):
    _, _, adapter, pairs = family
    pair = pairs[corruption]
    sites = helpers.every_site_kind(adapter, pair)
    fast = patch_pair(adapter, pair, sites, direction, batch_size=5)  # 5: batches that split groups unevenly
    slow = naive_patch_pair(adapter, pair, sites, direction)
    assert len(fast) == len(set(sites))
    assert not {"same_first_wordpiece", "tiny_ld_gap"} & set(fast["flags"].iloc[0].split(","))  # answers separate
    helpers.assert_same_table(fast, slow)
    assert fast["ld"].std() > 1e-3  # the cells differ: the comparison is not between constants


def test_whole_head_sweep_at_the_answer_and_every_position_equals_naive(family):
    _, _, adapter, pairs = family
    pair = pairs["image_smp"]
    answer = next(s for s, f in adapter.streams.items() if f.reads_answer)
    sites = [f"{stream}.*.{component}.head*" for stream, facts in adapter.streams.items() if stream != "vision"
             for component in facts.components if component.endswith("attn")] + [f"{answer}.*.mlp"]
    helpers.assert_same_table(patch_pair(adapter, pair, sites), naive_patch_pair(adapter, pair, sites))


def test_traces_reproduce_both_runs_through_the_fast_path(family):
    _, _, adapter, pairs = family
    clean, corrupt = pair_runs(adapter, pairs["image_smp"])
    receiving, source = adapter.trace(corrupt), adapter.trace(clean)
    torch.testing.assert_close(receiving.logits, adapter.run_logits(corrupt)[0])
    for name in adapter.full_patch_sites("image"):
        site = parse_site(name)
        batch = PatchBatch(site.stream, site.layer, "layer", torch.arange(receiving.num_positions[site.stream])[None])
        torch.testing.assert_close(adapter.patched_logits(receiving, source, [batch])[0], source.logits,
                                   atol=1e-4, rtol=1e-4)


def test_one_call_with_patches_at_several_layers_keeps_the_given_order(family):
    _, _, adapter, pairs = family
    if not adapter.cross_layer_streams:
        pytest.skip(f"{adapter.family} runs one layer per call")
    stream = next(iter(adapter.cross_layer_streams))
    pair = pairs["text_str"]  # the prompts differ from the first layer on (an image reaches mllama's later)
    clean, corrupt = pair_runs(adapter, pair)
    receiving, source = adapter.trace(corrupt), adapter.trace(clean)
    last, top = receiving.num_positions[stream] - 1, adapter.streams[stream].layers - 1
    sites = [parse_site(s) for s in (f"{stream}.{top}.self_attn.head1@{last}", f"{stream}.0.mlp@{last - 1}",
                                     f"{stream}.{top // 2}.layer@{last}", f"{stream}.0.self_attn.head0@{last}")]
    batches = []
    for site in sites:
        columns = None
        if site.head is not None:
            columns = torch.zeros(1, receiving.acts[(stream, site.layer)][site.target].shape[-1], dtype=torch.bool)
            columns[0, adapter.site_columns(site)] = True
        batches.append(PatchBatch(stream, site.layer, site.target, torch.tensor([[int(site.position)]]), columns))
    fast = adapter.patched_logits(receiving, source, batches)
    from notice.patching.naive import patched_logits, record

    values = record(adapter, clean, sites)
    plain = torch.cat([patched_logits(adapter, corrupt, site, values[site.module]) for site in sites])
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
    assert (plain - receiving.logits).abs().amax(dim=1).min() > 1e-3  # every patch moves the logits


def test_selection_and_the_engine_build_the_same_noisy_runs(family):
    _, _, adapter, pairs = family
    for kind in ("image_noise", "text_noise"):
        pair = pairs[kind]
        _, corrupt = pair_runs(adapter, pair)
        image = load_image(pair.clean_image)
        twice = adapter.run_logits(noisy_run(adapter, [pair, pair], [image, image]))
        torch.testing.assert_close(twice[1], adapter.run_logits(corrupt)[0], **CLOSE)
        silent = dataclasses.replace(pair, metadata={"noise": dict(pair.metadata["noise"], scale=0.0)})
        clean = adapter.answer_logits([image], [pair.clean_prompt])[0]
        torch.testing.assert_close(adapter.run_logits(noisy_run(adapter, [silent], [image]))[0], clean, **CLOSE)
        assert (twice[0] - clean).abs().max() > 1e-3  # the noise reaches the answer


# --------------------------------------------------------------------- head functions
def test_image_attention_equals_the_models_eager_attention(family):
    spec, _, adapter, _ = family
    image = helpers.shape_image(64)
    seen = adapter.image_attention(image, QUESTION, "red")
    rows, cols = seen.grid
    facts = adapter.streams[seen.stream]
    layers = seen.layers or tuple(range(facts.layers))
    assert layers == tuple(l for l in range(facts.layers) if facts.has(seen.component, l))
    assert seen.weights.shape[:2] == (len(layers), facts.heads) and seen.weights.shape[-1] == rows * cols
    assert seen.image_states.shape[0] == rows * cols and 0 <= seen.query < seen.weights.shape[2]
    with torch.no_grad():
        theirs = spec.eager_attention(adapter, adapter.prepare([image], [QUESTION]))
    torch.testing.assert_close(seen.weights, theirs.float(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- CLI
def test_notice_patch_runs_an_answer_head_sweep_and_an_image_sweep(family, tmp_path):
    from notice.cli import app
    from notice.pairs import write_pairs
    from notice.store import load_results

    _, folder, adapter, pairs = family
    answer = next(s for s, f in adapter.streams.items() if f.reads_answer)
    image_stream = next(s for s in adapter.streams if s != answer and s in ("projector", "vision"))
    pairs_file = write_pairs([pairs["image_smp"], pairs["text_str"]], tmp_path / "pairs.parquet")
    sites = f"{answer}.*.{adapter.streams[answer].components[1]}.head*@answer,{image_stream}.0.layer"
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(folder), "--out", str(tmp_path / "run"),
                                      "--sites", sites])
    assert result.exit_code == 0, result.output
    table = load_results(tmp_path / "run")
    assert set(table["stream"]) == {answer, image_stream} and table["ld"].notna().all()
    positions = adapter.num_positions(pair_runs(adapter, pairs["image_smp"])[0])
    assert len(table[table["stream"] == image_stream]) == 2 * positions[image_stream]


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_attribution_patching_estimates_every_site_kind(family, method):
    from notice.patching.attribution import attribute_pair

    _, _, adapter, pairs = family
    pair = pairs["image_smp"]
    sites = [s for s in helpers.every_site_kind(adapter, pair) if not s.endswith("@all")]
    estimate, exact = attribute_pair(adapter, pair, sites, method=method), patch_pair(adapter, pair, sites)
    assert list(estimate["site"]) == list(exact["site"]) and list(estimate.columns) == list(exact.columns)
    assert set(estimate["method"]) == {method} and estimate["p_correct"].isna().all()
    assert np.isfinite(estimate["ld"]).all() and (estimate["score"] >= 0).all() and estimate["score"].max() > 0


def test_attention_inputs_reproduce_the_traced_head_values(family):
    """What attention_inputs says each head reads (queries, keys, values, mask: rotary tables, windows,
    tiles, bidirectional image blocks) gives back the head values the model itself computed."""
    _, _, adapter, pairs = family
    trace = adapter.trace(pair_runs(adapter, pairs["image_smp"])[0])
    for stream, facts in adapter.streams.items():
        for component in (c for c in facts.components if c.endswith("attn")):
            having = [l for l in range(facts.layers) if facts.has(component, l)]  # e.g. cross-attention layers
            for layer in sorted({having[0], having[-1]}):
                read = adapter.attention_inputs(trace, stream, layer, component)
                z = (read.log_pattern().exp() @ read.v.double()).transpose(0, 1)  # [T, H, d]
                traced = trace.acts[(stream, layer)][f"{component}.z"]
                torch.testing.assert_close(z.reshape(len(traced), -1).float(), traced.float(), **CLOSE)
