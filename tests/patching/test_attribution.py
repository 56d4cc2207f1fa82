"""Attribution patching: exact where the model is linear, the QK fix where AtP linearises a softmax,
GradDrop as dropping the gradient by hand, and the CLI's methods, verification and comparison."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import helpers
from notice.models.base import edit_activation
from notice.models.blip import BlipAdapter
from notice.models.blocks.attention import AttentionInputs, exact_change, first_order_change
from notice.patching.attribution import _gradients, _hooks, attribute_pair, compare_tables
from notice.patching.engine import patch_pair
from notice.patching.inputs import pair_baseline, pair_runs
from notice.patching.sites import expand_sites

TINY = helpers.TINY_BLIP


def linearised_blip() -> BlipAdapter:
    """A tiny BLIP with every LayerNorm and activation made the identity: everything after the last decoder
    layer's cross-attention is then linear in its input."""
    model = helpers.sensitize(helpers.blip_model(TINY))
    for module in list(model.modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, nn.LayerNorm):
                setattr(module, child, nn.Identity())
        for attribute in ("intermediate_act_fn", "transform_act_fn", "activation_fn"):
            if hasattr(module, attribute):
                setattr(module, attribute, nn.Identity())
    return BlipAdapter(model.eval(), helpers.blip_processor(TINY["image_size"]), "linearised")


@pytest.fixture(scope="module")
def linear():
    return linearised_blip()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return helpers.make_pairs(tmp_path_factory.mktemp("pairs"), TINY["image_size"])


def _effect(table) -> np.ndarray:
    receiving = np.where(table["direction"] == "denoise", table["ld_corrupt"], table["ld_clean"])
    return table["ld"].to_numpy() - receiving


@pytest.mark.parametrize("corruption", ["image_smp", "text_str"])
def test_where_everything_downstream_is_linear_atp_equals_exact(linear, pairs, corruption):
    last = linear.streams["decoder"].layers - 1
    sites = [f"decoder.{last}.{c}@0" for c in ("layer", "mlp", "cross_attn")]
    exact = patch_pair(linear, pairs[corruption], sites)
    for method in ("atp", "atp*"):
        estimate = attribute_pair(linear, pairs[corruption], sites, method=method)
        assert list(estimate["site"]) == list(exact["site"]) and set(estimate["method"]) == {method}
        np.testing.assert_allclose(_effect(estimate), _effect(exact), atol=1e-5 * max(1, abs(_effect(exact)).max()))
    assert abs(_effect(exact)).max() > 1e-2  # the sites matter: the equality is not between zeros


@pytest.mark.parametrize("corruption", ["image_smp", "text_str"])
def test_the_qk_fix_is_exact_for_heads_where_plain_atp_linearises_the_pattern(linear, pairs, corruption):
    """The last decoder layer's cross-attention heads read a changed question (keys and values) and a changed
    [DEC] state (query): AtP* recomputes their patterns and matches exact patching; AtP's linearised softmax
    does not."""
    last = linear.streams["decoder"].layers - 1
    sites = [f"decoder.{last}.cross_attn.head*@0"]
    exact = _effect(patch_pair(linear, pairs[corruption], sites))
    fixed = _effect(attribute_pair(linear, pairs[corruption], sites, method="atp*"))
    plain = _effect(attribute_pair(linear, pairs[corruption], sites, method="atp"))
    np.testing.assert_allclose(fixed, exact, atol=1e-5 * max(1, abs(exact).max()))
    assert abs(plain - exact).max() > 1e-3 * abs(exact).max()


def _head(q_rows, k_rows, v_rows) -> AttentionInputs:
    to = lambda rows: torch.tensor(rows, dtype=torch.float64)[None]  # noqa: E731
    return AttentionInputs(to(q_rows), to(k_rows), to(v_rows), torch.ones(1, 3, dtype=torch.bool).tril(1)[-1:], 1.0)


def test_a_saturated_head_hides_a_query_change_from_first_order_but_not_from_the_fix():
    keys, values = [[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    receiving = _head([[2.0, 0.0]], keys, values)  # all attention on key 0: the softmax is saturated
    source = _head([[0.0, 2.0]], keys, values)  # one query change moves it all to key 1
    true = source.log_pattern().exp() @ source.v - receiving.log_pattern().exp() @ receiving.v
    torch.testing.assert_close(exact_change(receiving, source), true)
    assert true.abs().max() > 0.99 and first_order_change(receiving, source).abs().max() < 1e-6
    moved_key = _head([[2.0, 0.0]], [[10.0, 0.0], [20.0, 0.0], [0.0, 0.0]], values)  # key 1 alone changes
    assert exact_change(receiving, moved_key).abs().max() > 0.99 > 1e-6 > first_order_change(receiving, moved_key).abs().max()


def test_graddrop_is_the_gradient_with_one_layers_branches_cut_by_hand(tiny_blip, pairs):
    pair = pairs["image_smp"]
    clean, corrupt = pair_runs(tiny_blip, pair)
    base = pair_baseline(tiny_blip, pair, tiny_blip.run_logits(clean)[0], tiny_blip.run_logits(corrupt)[0])
    cells = expand_sites(["text.0.mlp@*", "text.0.cross_attn.head*@*", "decoder.0.layer@0"], tiny_blip.streams,
                         tiny_blip.num_positions(clean))
    _, _, ours = _gradients(tiny_blip, corrupt, _hooks(cells), base.correct_id, base.incorrect_id, [None, ("text", 1)])
    assert set(ours) == {None, ("text", 1)}
    by_hand: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for key, site in _hooks(cells).items():
            def anchor(t, key=key):
                by_hand[key] = t = t + torch.zeros((), requires_grad=True)
                return t
            stack.callback(edit_activation(*tiny_blip.hook_point(site), anchor).remove)
        for path in tiny_blip.stream_maps["text"].writes.values():  # text layer 1's branches pass no gradient
            module = tiny_blip.layer_module("text", 1).get_submodule(path)
            stack.callback(edit_activation(module, "output", lambda t: t.detach()).remove)
        logits = tiny_blip.run_logits(corrupt, grad=True)[0]
        metric = logits[base.correct_id] - logits[base.incorrect_id]
        grads = torch.autograd.grad(metric, list(by_hand.values()))
    for key, grad in zip(by_hand, grads):
        torch.testing.assert_close(ours[("text", 1)][key], grad[0])
    changed = [k for k in by_hand if not torch.allclose(ours[None][k], ours[("text", 1)][k])]
    assert changed  # dropping a layer does change the gradient upstream of it


def test_cli_patches_by_atp_star_verifies_the_top_and_compares(tiny_blip_dir, pairs, tmp_path):
    from notice.cli import app
    from notice.pairs import write_pairs
    from notice.store import load_results

    pairs_file = write_pairs([pairs["image_smp"], pairs["text_str"]], tmp_path / "pairs.parquet")
    sites = "text.*.cross_attn.head*,text.*.mlp"
    base = ["patch", str(pairs_file), "--model", str(tiny_blip_dir), "--sites", sites]
    runner = CliRunner()
    result = runner.invoke(app, base + ["--out", str(tmp_path / "atp"), "--method", "atp*", "--verify-top", "5"])
    assert result.exit_code == 0, result.output
    table = load_results(tmp_path / "atp")
    assert (table.groupby(["pair_id", "method"]).size().unstack()["exact"] == 5).all()
    estimated = table[table["method"] == "atp*"]
    assert estimated["p_correct"].isna().all() and (estimated["score"] >= 0).all()
    top = estimated.sort_values("score", ascending=False).groupby("pair_id").head(5)
    assert set(zip(top["pair_id"], top["site"])) == set(zip(*table.loc[table["method"] == "exact", ["pair_id", "site"]].T.values))
    assert runner.invoke(app, base + ["--out", str(tmp_path / "exact")]).exit_code == 0
    result = runner.invoke(app, ["compare", str(tmp_path / "atp"), str(tmp_path / "exact"), "--k", "3", "--k-prime", "10"])
    assert result.exit_code == 0 and "2 pairs: Spearman" in result.output, result.output


@pytest.mark.parametrize("extra, message", [
    (["--method", "atp", "--sites", "text.0.mlp@all"], "@all patches every position at once"),
    (["--verify-top", "3"], "use it with --method atp or atp*"),
    (["--method", "gradients"], "gradients"),
])
def test_bad_attribution_options_are_one_line_errors(tiny_blip_dir, pairs, tmp_path, extra, message):
    from notice.cli import app
    from notice.pairs import write_pairs

    pairs_file = write_pairs([pairs["image_smp"]], tmp_path / "pairs.parquet")
    result = CliRunner().invoke(app, ["patch", str(pairs_file), "--model", str(tiny_blip_dir), "--out",
                                      str(tmp_path / "out"), *extra])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "out").exists()


def test_comparison_counts_the_exact_top_cells_the_estimate_ranks_high():
    import pandas as pd

    sites = [f"s{i}" for i in range(6)]
    exact = pd.DataFrame({"pair_id": "p", "site": sites, "direction": "denoise", "ld": [5, 4, 3, 0, 0, 0],
                          "ld_corrupt": 0.0, "ld_clean": 6.0})
    approx = exact.assign(ld=[1, 0, 3, 0, 0, 2], score=[1, 0, 3, 0, 0, 2])  # misses s1, ranks s5 high
    result = compare_tables(approx, exact, k=2, k_prime=3)
    assert result["recall@2in3_mean"] == 0.5 and result["pairs_with_all_inside"] == 0.0
    assert list(result["largest_misses"]["site"]) == ["s1"]
