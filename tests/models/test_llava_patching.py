"""LLaVA sites: the plain way (hooks on transformers' modules, one full forward per cell) and the
KV-prefix fast path (recompute only from the patched layer and position on) agree to 1e-4."""

from __future__ import annotations

import pytest
import torch

import helpers
from notice.models.base import PatchBatch
from notice.patching.sites import ALL, Site, expand_sites, parse_site

TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tiny_llava):
    """A semantic-minimal-pair-like pair: same question, a red circle versus a blue triangle."""
    clean = helpers.shape_image(32, (255, 0, 0), "circle")
    corrupt = helpers.shape_image(32, (0, 0, 255), "triangle")
    return tiny_llava.runs_for(clean, corrupt, "what color is the shape?", "what color is the shape?")


def plain_patched_logits(adapter, receiving, source, site: Site) -> torch.Tensor:
    """One full forward of the receiving run with the site's activation overwritten by a forward hook."""
    module, kind = adapter.hook_point(site)
    kept = {}

    def grab(t):
        kept["value"] = t.clone()
        return t

    def patch(t):
        t = t.clone()
        rows = slice(None) if site.position == ALL else slice(int(site.position), int(site.position) + 1)
        columns = adapter.site_columns(site) or slice(None)
        t[:, rows, columns] = kept["value"][:, rows, columns]
        return t

    def hook_with(edit):
        if kind == "input":
            return module.register_forward_pre_hook(lambda m, args: (edit(args[0]),) + tuple(args[1:]))
        return module.register_forward_hook(lambda m, args, out: edit(out))

    for run, edit in ((source, grab), (receiving, patch)):
        handle = hook_with(edit)
        try:
            logits = adapter.run_logits(run)
        finally:
            handle.remove()
    return logits[0]


def fast_patched_logits(adapter, receiving_trace, source_trace, sites: list[Site]) -> torch.Tensor:
    """All sites of one (stream, layer, target) through the fast path in one batch."""
    first = sites[0]
    target = first.component + (".z" if first.head is not None else "")
    count = receiving_trace.num_positions[first.stream]
    positions = torch.tensor([list(range(count)) if s.position == ALL else [int(s.position)] for s in sites])
    columns = None
    if first.head is not None:
        width = receiving_trace.acts[(first.stream, first.layer)][target].shape[-1]
        columns = torch.zeros(len(sites), width, dtype=torch.bool)
        for row, site in enumerate(sites):
            columns[row, adapter.site_columns(site)] = True
    return adapter.patched_logits(receiving_trace, source_trace, PatchBatch(first.stream, first.layer, target,
                                                                            positions, columns))


def _traces(adapter, runs):
    clean, corrupt = runs
    return adapter.trace(corrupt), adapter.trace(clean)  # denoise: clean activations into the corrupt run


def test_trace_logits_are_the_plain_forward(tiny_llava, runs):
    clean, corrupt = runs
    receiving, source = _traces(tiny_llava, runs)
    torch.testing.assert_close(receiving.logits, tiny_llava.run_logits(corrupt)[0])
    torch.testing.assert_close(source.logits, tiny_llava.run_logits(clean)[0])
    assert not torch.allclose(receiving.logits, source.logits, atol=1e-3)  # the image matters


@pytest.mark.parametrize("pattern", [
    "lm.1.self_attn.head*@{answer}",  # every query head at the answer token (grouped-query attention)
    "lm.0.self_attn.head*@{image}",  # heads at an image token
    "lm.2.self_attn@*",  # every position, image tokens included
    "lm.1.mlp@{text}",
    "lm.0.layer@*",
    "lm.2.layer@{answer}",
    "projector.0.layer@*",
    "vision.0.self_attn.head*@3",
    "vision.1.mlp@*",
    "vision.0.layer@0",
])
def test_fast_path_equals_the_plain_way_on_every_site_kind(tiny_llava, runs, pattern):
    clean, corrupt = runs
    ids = corrupt.inputs.input_ids[0]
    image = tiny_llava.image_positions(ids)
    pattern = pattern.format(answer=tiny_llava.answer_position(ids), image=image.start + 5,
                             text=tiny_llava.question_positions("what color is the shape?")[1])
    sites = expand_sites([pattern], tiny_llava.streams, tiny_llava.num_positions("what color is the shape?"))
    receiving, source = _traces(tiny_llava, runs)
    fast = fast_patched_logits(tiny_llava, receiving, source, sites)
    plain = torch.stack([plain_patched_logits(tiny_llava, corrupt, clean, site) for site in sites])
    torch.testing.assert_close(fast, plain, **TOLERANCE)
    changed = (plain - receiving.logits).abs().amax(dim=1)
    assert float(changed.max()) > 1e-3  # the sites do matter, so equality is not vacuous


@pytest.mark.parametrize("site", ["lm.0.layer@all", "projector.0.layer@all", "vision.0.layer@all"])
def test_patching_a_whole_stream_reproduces_the_source_run(tiny_llava, runs, site):
    clean, corrupt = runs
    receiving, source = _traces(tiny_llava, runs)
    fast = fast_patched_logits(tiny_llava, receiving, source, [parse_site(site)])[0]
    plain = plain_patched_logits(tiny_llava, corrupt, clean, parse_site(site))
    torch.testing.assert_close(plain, source.logits, **TOLERANCE)
    torch.testing.assert_close(fast, source.logits, **TOLERANCE)


def test_patching_nothing_reproduces_the_receiving_run(tiny_llava, runs):
    receiving, source = _traces(tiny_llava, runs)
    for stream, target in (("lm", "self_attn.z"), ("vision", "self_attn.z"), ("projector", "layer")):
        count = receiving.num_positions[stream]
        width = receiving.acts[(stream, 0)][target].shape[-1]
        batch = PatchBatch(stream, 0, target, torch.arange(count)[None], torch.zeros(1, width, dtype=torch.bool))
        torch.testing.assert_close(tiny_llava.patched_logits(receiving, source, batch)[0], receiving.logits,
                                   **TOLERANCE)


def test_a_late_patch_recomputes_only_the_positions_after_it(tiny_llava, runs):
    """The KV prefix of the receiving run serves every earlier position: only the answer row is rerun."""
    receiving, source = _traces(tiny_llava, runs)
    last = receiving.num_positions["lm"] - 1
    seen = []
    layer = tiny_llava._lm.layers[2]
    handle = layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        batch = PatchBatch("lm", 1, "self_attn.z", torch.tensor([[last]] * 3),
                           torch.eye(6, dtype=torch.bool).repeat_interleave(8, dim=1)[:3])
        tiny_llava.patched_logits(receiving, source, batch)
    finally:
        handle.remove()
    assert seen == [(3, 1, helpers.TINY_LLAVA["text_hidden"])]  # 3 cells × 1 position, layer 2 only


def test_one_call_with_patches_at_several_layers_equals_the_plain_way(tiny_llava, runs):
    """Rows join the rerun at the layer after their own patch; the result keeps the batches' order even
    when the layers come unsorted, and each row equals one full forward with its patch."""
    receiving, source = _traces(tiny_llava, runs)
    last = receiving.num_positions["lm"] - 1
    sites = [parse_site(f"lm.2.self_attn.head1@{last}"), parse_site(f"lm.0.mlp@{last - 1}"),
             parse_site(f"lm.1.layer@{last}"), parse_site(f"lm.0.self_attn.head4@{last}")]
    batches = []
    for site in sites:
        target = site.component + (".z" if site.head is not None else "")
        columns = None
        if site.head is not None:
            columns = torch.zeros(1, receiving.acts[("lm", site.layer)][target].shape[-1], dtype=torch.bool)
            columns[0, tiny_llava.site_columns(site)] = True
        batches.append(PatchBatch("lm", site.layer, target, torch.tensor([[int(site.position)]]), columns))
    fast = tiny_llava.patched_logits(receiving, source, batches)
    clean, corrupt = runs
    plain = torch.stack([plain_patched_logits(tiny_llava, corrupt, clean, site) for site in sites])
    torch.testing.assert_close(fast, plain, **TOLERANCE)
    assert (plain - receiving.logits).abs().amax(dim=1).min() > 1e-3  # every patch moves the logits


def test_the_engine_runs_an_answer_token_head_sweep_in_one_call(tiny_llava, runs):
    from notice.patching.engine import plan

    receiving, _ = _traces(tiny_llava, runs)
    last = receiving.num_positions["lm"] - 1
    sites = expand_sites([f"lm.*.self_attn.head*@{last}", f"lm.*.mlp@{last - 1}", "lm.1.layer@all"],
                         tiny_llava.streams, receiving.num_positions)
    named = expand_sites(["lm.*.self_attn.head*@answer"], tiny_llava.streams, receiving.num_positions)
    assert named == [s for s in sites if s.head is not None]  # the answer is read at the last prompt position
    groups = plan(sites, list(tiny_llava.streams), tiny_llava.cross_layer_streams)
    layers = list(range(tiny_llava.streams["lm"].layers))
    heads = tiny_llava.streams["lm"].heads
    assert [(g.layers, len(g.cells)) for g in groups] == [([1], 1), (layers, len(layers)),
                                                          (layers, len(layers) * heads)]
    assert plan(sites, list(tiny_llava.streams)) != groups  # without cross-layer streams: one layer a group


def test_site_catalogue_names_llava_streams(tiny_llava):
    from notice.patching.sites import site_catalogue

    lines = site_catalogue(tiny_llava.streams)
    assert "lm.{0..2}.self_attn.head{0..5}@{token}" in lines
    assert "projector.{0..0}.layer@{image token}" in lines
    assert not any(line.startswith("projector") and "head" in line for line in lines)


def test_noise_runs_agree_between_selection_and_patching(tiny_llava):
    """A Gaussian-noise pair's corrupt logits are the same through corrupt.noise and through a Run."""
    from notice.corrupt.noise import noise_logits, noise_spec, resolve_positions
    from notice.pairs import Pair

    image = helpers.shape_image(32)
    question = "what color is the shape?"
    alone = list(range(1, len(tiny_llava.tokenizer(question)["input_ids"])))  # every question token after <s>
    assert tiny_llava.prompt_positions(question, alone) == tiny_llava.question_positions(question)
    for stream, positions in (("vision", "all"), ("text", alone)):
        pair = Pair(id="p", task="t", corruption="image_noise" if stream == "vision" else "text_noise", clean_image="x.png",
                    corrupt_image="x.png", clean_prompt=question, corrupt_prompt=question, correct="red",
                    incorrect="blue", metadata={"noise": noise_spec(stream, positions, seed=3)})
        selected = noise_logits(tiny_llava, [pair], [image])[0]
        resolved = dict(pair.metadata["noise"], positions=resolve_positions(tiny_llava, pair))
        _, corrupt = tiny_llava.runs_for(image, image, question, question, resolved)
        torch.testing.assert_close(tiny_llava.run_logits(corrupt)[0], selected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(selected, tiny_llava.answer_logits([image], [question])[0], atol=1e-3)
    assert len(resolve_positions(tiny_llava, pair)) > 0
