"""What Qwen2-VL and Qwen2.5-VL add to the contract suite: image-token counts that depend on the image,
multimodal rotary positions, a tower without a batch dimension whose Qwen2.5-VL layers attend inside
windows, and the inputs that must be refused (a pair of two grids, a checkpoint of another family)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import helpers
import tiny_qwen
from families import llava_eager_attention
from notice.cli import app
from notice.models import load_model
from notice.models.base import Run
from notice.pairs import Pair, write_pairs
from notice.patching.engine import patch_pair
from notice.patching.inputs import pair_runs
from notice.patching.naive import naive_patch_pair

QUESTION = "what color is the shape?"
SIZES = [(64, 64), (64, 40), (16, 16), (100, 37)]  # (width, height): square, wide, below, off the grid


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    folder = tiny_qwen.save_qwen(tmp_path_factory.mktemp(request.param), request.param)
    return folder, load_model(str(folder))


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return tiny_qwen.save_qwen(tmp_path_factory.mktemp("qwen25"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen25(qwen25_dir):
    return load_model(str(qwen25_dir))


def picture(size: tuple[int, int], color=(255, 0, 0)) -> Image.Image:
    width, height = size
    return helpers.shape_image(64, color).resize((width, height))


def color_pair(folder: Path, size: tuple[int, int], corrupt_size: tuple[int, int] | None = None, **fields) -> Pair:
    corrupt_size = corrupt_size or size
    red, blue = folder / f"red-{size[0]}x{size[1]}.png", folder / f"blue-{corrupt_size[0]}x{corrupt_size[1]}.png"
    picture(size).save(red)
    picture(corrupt_size, (0, 0, 255)).save(blue)
    defaults = dict(id="smp", task="colors", corruption="image_smp", clean_image=str(red), corrupt_image=str(blue),
                    clean_prompt=QUESTION, corrupt_prompt=QUESTION, correct="red", incorrect="blue")
    return Pair(**{**defaults, **fields})


# ---------------------------------------------------------------------- image sizes
@pytest.mark.parametrize("size", SIZES)
def test_grid_and_prompt_length_follow_the_processor_for_any_image_size(qwen, size):
    _, adapter = qwen
    image = picture(size)
    inputs = adapter.prepare([image], [QUESTION])
    assert list(adapter.image_grid(image)) == inputs["image_grid_thw"][0, 1:].tolist()
    rows, cols = adapter.image_grid(image)
    assert adapter.input_length(image, QUESTION) == inputs.input_ids.shape[1]
    assert len(adapter.image_positions(inputs.input_ids[0])) == rows * cols // 4
    assert adapter.num_positions(Run(inputs)) == {"vision": rows * cols, "projector": rows * cols // 4,
                                                  "lm": inputs.input_ids.shape[1]}


def test_images_of_several_grids_are_batched_apart_and_answer_as_alone(qwen):
    _, adapter = qwen
    images = [picture(size) for size in SIZES] + [helpers.noise_image(64, 1)]
    questions = [QUESTION, "is it red?", QUESTION, "what shape is it?", QUESTION]
    batches = adapter.batches_by_length(questions, 8, images)
    assert all(len({adapter.image_grid(images[i]) for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(images)))
    owner = [0, 1, 2, 3, 0]  # two questions on one image: encoded once, grouped with its grid
    shared = adapter.answer_logits(images, questions, image_index=owner)
    alone = torch.cat([adapter.answer_logits([images[o]], [q]) for o, q in zip(owner, questions)])
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    square, wide = picture((64, 64)), picture((72, 8))  # 6x6 and 2x18 patches: 9 image tokens each
    assert adapter.input_length(square, QUESTION) == adapter.input_length(wide, QUESTION)
    assert len(adapter.batches_by_length([QUESTION] * 2, 8, [square, wide])) == 2
    with pytest.raises(ValueError, match="one patch grid"):
        adapter.prepare([square, wide], [QUESTION, QUESTION])


# ------------------------------------------------------------------------ positions
def test_lm_positions_are_the_models_multimodal_ones_and_matter(qwen):
    _, adapter = qwen
    image = picture((64, 40))
    run = Run(adapter.prepare([image], [QUESTION]))
    trace = adapter.trace(run, {"lm"})
    ids = run.inputs.input_ids
    theirs = adapter.model.model.get_rope_index(ids, image_grid_thw=run.inputs.image_grid_thw,
                                                mm_token_type_ids=run.inputs.mm_token_type_ids)[0]
    count = ids.shape[1]
    torch.testing.assert_close(adapter.rope_positions(trace.cache, 0, count), theirs)
    image_at = adapter.image_positions(ids[0])
    assert sorted(adapter.text_positions(ids[0]).tolist() + image_at.tolist()) == list(range(count))
    rows, cols = adapter.feature_grid(run)
    height, width = theirs[1, 0, image_at], theirs[2, 0, image_at]  # row and column of each image token
    assert (height.view(rows, cols) - height[0]).tolist() == [[r] * cols for r in range(rows)]
    assert (width.view(rows, cols) - width[0]).tolist() == [list(range(cols))] * rows
    assert int(theirs[0, 0, -1]) < count - 1  # the text after the image continues from the grid's largest
    plain = adapter.model(**run.inputs, position_ids=torch.arange(count)[None].expand(3, 1, -1)).logits[0, -1]
    assert (plain - trace.logits).abs().max() > 1e-2  # 1-D positions would give another model


def test_text_noise_lands_on_the_question_whatever_the_images_token_count(qwen, tmp_path):
    _, adapter = qwen
    from notice.corrupt.noise import noise_spec

    pair = color_pair(tmp_path, (16, 16), (16, 16), id="tnoise", corruption="text_noise",
                      metadata={"noise": noise_spec("text", [1, 2], seed=4)})
    pair = Pair(**{**pair.__dict__, "corrupt_image": pair.clean_image})
    clean, corrupt = pair_runs(adapter, pair)
    assert adapter.num_positions(clean)["projector"] < adapter.image_token_count()  # fewer than the reference
    positions = corrupt.noise_of(0)["positions"]
    alone = adapter.tokenizer.convert_ids_to_tokens(adapter.tokenizer(QUESTION)["input_ids"])
    tokens = adapter.position_labels(clean)["lm"]
    assert [tokens[p] for p in positions] == alone[1:3] == ["Ġcolor", "Ġis"]
    sites = ["lm.0.layer@all", f"lm.1.self_attn.head2@{positions[0]}", "lm.2.mlp@last", "projector.0.layer@1"]
    helpers.assert_same_table(patch_pair(adapter, pair, sites), naive_patch_pair(adapter, pair, sites))


# ---------------------------------------------------------------------- the tower
def test_window_order_labels_and_masks_are_the_models_own(qwen25):
    """Qwen2.5-VL on a wide image: a 2x3 grid of merged tokens in windows of 2x2 and 2x1 tokens."""
    from transformers.vision_utils import get_vision_window_index

    image = picture((64, 40))
    run = Run(qwen25.prepare([image], [QUESTION]))
    rows, cols = qwen25.run_grid(run)
    assert (rows // 2, cols // 2) == (2, 3)
    vision = qwen25.model.config.vision_config
    window_index, bounds = get_vision_window_index(run.inputs.image_grid_thw, 2, vision.window_size, vision.patch_size)
    assert qwen25.unit_order((rows, cols)).tolist() == window_index.tolist()
    labels = qwen25.position_labels(run)
    merged_cols = cols // 2
    assert labels["projector"] == [f"patch {u // merged_cols},{u % merged_cols}" for u in window_index.tolist()]
    assert labels["vision"][4:8] == ["patch 0,2", "patch 0,3", "patch 1,2", "patch 1,3"]  # the second unit
    trace = qwen25.trace(run, {"vision"})
    windowed, full = trace.cache["vision_masks"][0], trace.cache["vision_masks"][vision.fullatt_block_indexes[0]]
    assert full is None and windowed is not None and windowed.sum(1).unique().numel() > 1  # windows of two sizes
    assert windowed.sum().item() == sum(int(b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))


def test_vision_sites_are_exact_across_windowed_and_full_layers(qwen, tmp_path):
    _, adapter = qwen
    pair = color_pair(tmp_path, (64, 40))
    last = adapter.streams["vision"].layers - 1
    sites = [f"vision.{l}.{c}@{p}" for l in range(last + 1) for c in ("layer", "self_attn.head1", "mlp")
             for p in (0, 17)] + [f"vision.{last - 1}.layer@all", "projector.0.layer@4", "projector.0.layer@all"]
    for direction in ("denoise", "noise"):
        fast = patch_pair(adapter, pair, sites, direction)
        helpers.assert_same_table(fast, naive_patch_pair(adapter, pair, sites, direction))
        assert fast["ld"].std() > 1e-3


def test_head_functions_read_the_merged_grid_of_each_image(qwen):
    _, adapter = qwen
    image = picture((64, 40))
    seen = adapter.image_attention(image, QUESTION, "red")
    assert seen.grid == (2, 3) and seen.weights.shape[-1] == 6 == seen.image_states.shape[0]
    with torch.no_grad():
        theirs = llava_eager_attention(adapter, adapter.prepare([image], [QUESTION]))
    torch.testing.assert_close(seen.weights, theirs.float(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- bad input
def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_pair_of_two_grids_is_one_line_naming_the_pair_before_anything_is_written(qwen, tmp_path):
    folder, _ = qwen
    good = color_pair(tmp_path, (64, 64), id="good")
    bad = color_pair(tmp_path, (64, 64), (64, 40), id="mixed-sizes/3")
    pairs = write_pairs([good, bad], tmp_path / "pairs.parquet")
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["patch", str(pairs), "--model", str(folder), "--out", str(tmp_path / "res"),
                                      "--sites", "lm.*.self_attn.head*@answer"])
    assert result.exit_code == 2, result.output
    message = result.stderr.rstrip("\n")
    assert "\n" not in message and message.startswith("error: pair mixed-sizes/3: ")
    assert "a 6x6 patch grid" in message and "a 4x6 one" in message and "resize both to one size" in message
    assert _files(tmp_path) == before


def test_a_checkpoint_of_another_family_is_one_line_naming_its_class(qwen, tmp_path):
    folder, _ = qwen
    other = Path(shutil.copytree(folder, tmp_path / "qwen3"))
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"])
    (other / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["info", "--model", str(other)])
    assert result.exit_code == 2
    message = result.stderr.rstrip("\n")
    assert "\n" not in message and "Qwen3VLForConditionalGeneration (model type 'qwen3_vl') is not supported" in message
    assert "qwen2_5_vl, qwen2_vl" in message and "add an adapter" in message


# ------------------------------------------------------------------- 7B facts
def test_qwen25_vl_7b_architecture_facts_without_weights():
    """Qwen/Qwen2.5-VL-7B-Instruct's config (built on the meta device) and its processor's sizes: a 448 px
    image gives 32x32 patches and 256 image tokens; 28 LM layers of 28 query heads over 4 key/value heads."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from notice.models.qwen2_vl import Qwen25VLAdapter

    processor = tiny_qwen.qwen_processor("qwen2_5_vl", dict(tiny_qwen.TINY, patch=14, max_side=3584))
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=len(processor.tokenizer), max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                              image_token_id=processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    adapter = Qwen25VLAdapter(model, processor, "Qwen2.5-VL-7B (meta)")
    assert adapter.patch_grid == (32, 32, 14) and adapter.image_token_count() == 256
    assert adapter.image_grid(Image.new("RGB", (64, 64))) == (4, 4)  # easy-VQA: 4 image tokens
    lm, tower = adapter.streams["lm"], adapter.streams["vision"]
    assert (lm.layers, lm.heads, lm.head_dim, adapter.blocks["lm"][0].kv_heads) == (28, 28, 128, 4)
    assert (tower.layers, tower.heads, tower.hidden) == (32, 16, 1280)
    assert "112 px windows except on layers 7, 15, 23, 31" in tower.description
    assert adapter.unit_order((32, 32))[:5].tolist() == [0, 1, 2, 3, 16]  # 4x4-token windows


# ------------------------------------------------------------- the command line
def test_every_verb_runs_on_a_saved_checkpoint(qwen25_dir, tmp_path):
    """ask, pairs (STR under Qwen's tokenizer), select, patch (the answer-token head sweep and an
    image-token sweep), head-functions and report, on easy-VQA."""
    model = ["--model", str(qwen25_dir)]

    def run(*argv: str):
        result = CliRunner().invoke(app, [*argv, *model])
        assert result.exit_code == 0, result.output
        return result

    image = tmp_path / "shape.png"
    helpers.shape_image(64).save(image)
    assert "top candidates" in run("ask", str(image), QUESTION).output
    pairs, selected = tmp_path / "pairs.parquet", tmp_path / "selected.parquet"
    run("pairs", "easyvqa-color", "--limit", "2", "--out", str(pairs), "--corruptions", "image_smp,text_str")
    chosen = CliRunner().invoke(app, ["select", str(pairs), "--out", str(selected), "--no-balance", *model])
    assert re.search(r"kept \d+ of 7 pairs", chosen.output), chosen.output  # a random model: maybe none kept
    run("patch", str(pairs), "--out", str(tmp_path / "results"), "--limit", "2",
        "--sites", "lm.*.self_attn.head*@answer,lm.1.self_attn@*,projector.0.layer")
    from notice.store import load_results

    table = load_results(tmp_path / "results")
    image_tokens = table[(table["stream"] == "lm") & table["token"].str.startswith("<image patch")]
    assert len(image_tokens) == 2 * 9 and table["ld"].notna().all()  # 64 px images shrunk to 24 px: 3x3 tokens
    run("head-functions", str(pairs), "--out", str(tmp_path / "functions"), "--limit", "2")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "results"), "--out", str(tmp_path / "report"),
                                      "--pairs", str(pairs), "--head-functions", str(tmp_path / "functions")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").is_file()
