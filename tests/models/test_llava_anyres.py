"""LLaVA-NeXT and LLaVA-OneVision beyond the contract suite: image tokens that vary with the image's
size (tiles, unpadding, OneVision's shrinking, newlines), tiled towers as one stream, pairs whose
images tile differently, noise over tiles (tiny random checkpoints built here, see helpers.TINY_ANYRES)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import helpers
from notice.corrupt.noise import noise_spec
from notice.errors import NoticeError
from notice.models import load_model
from notice.models.base import Run
from notice.pairs import write_pairs
from notice.patching.engine import patch_pair
from notice.patching.inputs import pair_runs
from notice.patching.naive import naive_patch_pair

WIDE = (48, 24)  # not square: NeXT unpads the canvas; OneVision with anyres_max_1 picks 1x2 tiles and shrinks them
SHRINKING = dict(helpers.TINY_ANYRES, pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], aspect_ratio="anyres_max_1")


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres(request, tmp_path_factory):
    if request.param == "llava_next":
        folder = helpers.save_llava_next(tmp_path_factory.mktemp("tiny-next"))
    else:
        folder = helpers.save_llava_onevision(tmp_path_factory.mktemp("tiny-onevision"), SHRINKING)
    return load_model(str(folder)), folder, wide_pairs(tmp_path_factory.mktemp(f"pairs-{request.param}"))


def wide_pairs(folder):
    """The contract suite's pairs on WIDE images, and an image-noise pair on the object's mask."""
    pairs = helpers.make_pairs(folder, 64)
    for name in ("red.png", "blue.png"):
        Image.open(folder / name).resize(WIDE).save(folder / name)
    mask = np.zeros(WIDE[::-1], dtype=np.uint8)
    mask[6:18, 12:36] = 255
    Image.fromarray(mask).save(folder / "red_mask.png")
    base = pairs["image_noise"]
    pairs["object_noise"] = dataclasses.replace(base, id="onoise", metadata={
        "noise": noise_spec("vision", "object", seed=5), "clean_mask": str(folder / "red_mask.png")})
    return pairs


def test_the_staged_forward_equals_the_models_own_for_images_of_any_size(anyres):
    adapter, _, _ = anyres
    counts = set()
    for size in [(32, 32), WIDE, (20, 70), (8, 8)]:
        images = [helpers.shape_image(64).resize(size), helpers.noise_image(64, 1).resize(size)]
        inputs = adapter.prepare(images, ["what color is the shape?"] * 2)
        with torch.no_grad():
            theirs = adapter.model(**inputs).logits[:, -1]
        torch.testing.assert_close(adapter.run_logits(Run(inputs)), theirs, atol=1e-5, rtol=1e-5)
        run = Run(adapter.input_row(inputs, 0))
        image = adapter.image_positions(inputs.input_ids[0])
        labels = adapter.position_labels(run)
        assert [labels["lm"][p].startswith("<image ") for p in range(len(labels["lm"]))].count(True) == len(image)
        assert adapter.num_positions(run)["lm"] == inputs.input_ids.shape[1] <= adapter.token_length("what color is "
                                                                                                   "the shape?")
        counts.add(len(image))
    assert len(counts) > 1  # the image's size decides how many tokens it takes


@pytest.mark.parametrize("corruption", ["image_smp", "text_str", "image_noise", "object_noise"])
def test_engine_equals_naive_on_tiles_unpadding_and_shrinking(anyres, corruption):
    adapter, _, pairs = anyres
    pair = pairs[corruption]
    sites = helpers.every_site_kind(adapter, pair) + ["projector.0.layer@*"]
    helpers.assert_same_table(patch_pair(adapter, pair, sites, batch_size=5), naive_patch_pair(adapter, pair, sites))


def test_object_noise_covers_the_objects_patches_in_every_tile(anyres):
    adapter, _, pairs = anyres
    clean, _ = pair_runs(adapter, pairs["image_noise"])
    spec = pair_runs(adapter, pairs["object_noise"])[1].noise_of(0)
    every = adapter.resolve_noise(noise_spec("vision", "all", seed=5), pairs["image_noise"].clean_prompt, clean)
    per_tile = adapter.vision_positions()
    tiles = {p // per_tile for p in spec["positions"]}
    assert set(spec["positions"]) < set(every["positions"]) and len(tiles) >= 2 and 0 in tiles  # base and a tile
    assert len(every["positions"]) == adapter.num_positions(clean)["projector"]  # every patch, no [CLS]


def test_a_pair_whose_images_tile_differently_is_one_line_naming_it(anyres, tmp_path):
    from notice.cli import app

    adapter, folder, pairs = anyres
    Image.new("RGB", (32, 32), "white").save(tmp_path / "square.png")
    pair = dataclasses.replace(pairs["image_smp"], id="mixed", corrupt_image=str(tmp_path / "square.png"))
    with pytest.raises(NoticeError, match=r"^pair mixed: the clean image is 48x24 and the corrupt one 32x32"):
        pair_runs(adapter, pair)
    pairs_file = write_pairs([pair], tmp_path / "pairs.parquet")
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(folder), "--out", str(tmp_path / "run"),
                                      "--sites", "lm.0.mlp@answer"])
    assert result.exit_code == 2 and "pair mixed" in result.output and "same size" in result.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.parquet"))


def test_batches_group_images_by_size(anyres):
    adapter, _, _ = anyres
    images = [helpers.noise_image(64, s).resize(size) for s, size in enumerate([(32, 32), WIDE, (32, 32), WIDE])]
    questions = ["what color is the shape?"] * 4
    batches = adapter.batches_by_length(questions, 8, images)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]
    together = adapter.answer_logits(images, questions)
    alone = torch.cat([adapter.answer_logits([image], questions[:1]) for image in images])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_head_functions_read_the_base_tile(anyres):
    adapter, _, _ = anyres
    image = helpers.shape_image(64).resize(WIDE)
    seen = adapter.image_attention(image, "what color is the shape?", "red")
    inputs = adapter.prepare([image], ["what color is the shape?"])
    with helpers_eager(adapter.model):
        with torch.no_grad():
            out = adapter.model(**inputs, output_attentions=True)
    base = adapter.image_positions(inputs.input_ids[0])[:seen.grid[0] * seen.grid[1]]
    torch.testing.assert_close(seen.weights, torch.stack(out.attentions, dim=1)[0][..., base].float(), atol=1e-5,
                               rtol=1e-4)


def helpers_eager(model):
    from families import eager

    return eager(model)
