"""Gemma 3 beyond the contract suite: the bidirectional image block, sliding windows, one BOS, scaled
embeddings (tiny random checkpoint built here, see helpers.TINY_GEMMA3)."""

from __future__ import annotations

import pytest
import torch

import helpers
from notice.models import load_model
from notice.models.gemma3 import block_mask, image_blocks
from notice.patching.engine import patch_pair
from notice.patching.inputs import pair_runs
from notice.patching.naive import hooked, naive_patch_pair, record
from notice.patching.sites import parse_site


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = helpers.save_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), helpers.TINY_GEMMA3)
    pairs = helpers.make_pairs(tmp_path_factory.mktemp("pairs-gemma3"), helpers.TINY_GEMMA3["image_size"])
    return load_model(str(folder)), pairs


def test_the_prompt_has_one_bos_and_one_image_block_between_its_markers(gemma):
    adapter, _ = gemma
    tokens = adapter.tokenize("what color is the shape?")
    assert tokens[:2] == ["<bos>", "<start_of_turn>"] and tokens.count("<bos>") == 1
    ids = adapter.prepare([helpers.shape_image(64)], ["what color is the shape?"]).input_ids[0]
    image = adapter.image_positions(ids).tolist()
    assert image == list(range(image[0], image[0] + adapter.image_token_count()))
    assert tokens[image[0] - 1] == "<start_of_image>" and tokens[image[-1] + 1] == "<end_of_image>"


def test_masks_open_the_image_block_both_ways_and_slide_on_local_layers():
    blocks = image_blocks(torch.tensor([2, 3, 4]), 8)  # text 0-1, image 2-4, text 5-7
    assert blocks.tolist() == [-1, -1, 0, 0, 0, -1, -1, -1]
    full, sliding = block_mask(blocks, 0, 8, None), block_mask(blocks, 0, 8, 2)
    assert full[2, 4] and full[4, 2] and not full[1, 2] and not full[5, 6]  # image sees its future image tokens
    assert full[7, 0] and not sliding[7, 0] and sliding[7, 6] and sliding[7, 7]  # keys < 2 behind the query
    assert sliding[2, 4] and not sliding[4, 2]  # the block's future stays visible, its distant past not
    torch.testing.assert_close(block_mask(blocks, 5, 3, 2), sliding[5:])  # a rerun's rows are the same rows


def test_a_patch_inside_the_image_block_changes_earlier_image_positions_and_the_engine_reproduces_it(gemma,
                                                                                                    monkeypatch):
    adapter, pairs = gemma
    pair = pairs["image_smp"]
    clean, corrupt = pair_runs(adapter, pair)
    image = adapter.image_positions(corrupt.inputs.input_ids[0]).tolist()
    first, last = image[0], image[-1]
    site = parse_site(f"lm.0.layer@{last}")
    value = record(adapter, clean, [site])[site.module]

    def layer_one_output(patched: bool) -> torch.Tensor:
        seen = record(adapter, corrupt, [parse_site("lm.1.layer")])
        if not patched:
            return seen["lm.1.layer"]

        def patch(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[:, last] = value[last]
            return t
        with hooked(adapter, site, patch, corrupt):
            return record(adapter, corrupt, [parse_site("lm.1.layer")])["lm.1.layer"]

    change = (layer_one_output(True) - layer_one_output(False)).abs().amax(dim=-1)  # [T]
    assert change[first] > 1e-3  # the block's first token reads the patched last one
    assert change[:first].max() == 0  # text before the block never sees it
    assert adapter.rerun_start(adapter.trace(corrupt).cache, last) == first
    assert adapter.rerun_start(adapter.trace(corrupt).cache, first - 1) == first - 1

    sites = [f"lm.*.layer@{p}" for p in image] + [f"lm.*.self_attn.head*@{p}" for p in (first, last)]
    fast = patch_pair(adapter, pair, sites)
    helpers.assert_same_table(fast, naive_patch_pair(adapter, pair, sites))
    # reusing the prefix up to the patched position, as in a causal LM, would miss the block's earlier tokens
    monkeypatch.setattr(adapter, "rerun_start", lambda cache, position: position)
    causal = patch_pair(adapter, pair, [f"lm.0.layer@{last}"], checks=False)
    assert abs(float(causal["ld"].iloc[0]) - float(fast[fast["site"] == f"lm.0.layer@{last}"]["ld"].iloc[0])) > 1e-3


def test_text_noise_scales_with_the_scaled_embeddings(gemma):
    adapter, _ = gemma
    table = adapter.embed_tokens(torch.arange(adapter.vocab_size)[None])[0].detach()
    assert adapter.embedding_sigma("text", table[None]) == pytest.approx(float(table.std()), rel=1e-4)
    assert adapter.embedding_sigma("text", table[None]) > 2 * float(adapter.word_embeddings.weight.detach().std())


def test_an_unsupported_checkpoint_is_one_line_naming_its_class(tmp_path):
    from typer.testing import CliRunner

    from notice.cli import app

    (tmp_path / "config.json").write_text('{"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"]}')
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "gemma3" in line
    assert "Idefics3ForConditionalGeneration (model type 'idefics3') is not supported" in line


def test_pan_and_scan_crops_are_refused_in_one_line(tmp_path):
    from notice.errors import NoticeError
    from notice.models.gemma3 import Gemma3Adapter

    folder = helpers.save_gemma3(tmp_path / "gemma3", helpers.TINY_GEMMA3)
    processor = Gemma3Adapter.load_processor(folder)
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(NoticeError, match="pan-and-scan crops.*do_pan_and_scan=False"):
        Gemma3Adapter(load_model(str(folder)).model, processor, "crops")
