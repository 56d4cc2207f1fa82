"""The NOTICE paper's head rule on hand-made tables: the heads it picks, the position each variant
reads, and the pairs it cannot score; then on tables patched from real (tiny) BLIP and LLaVA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from notice.analysis import paper_rule as pr
from notice.analysis.universal import condition_labels, rank_by_condition
from notice.errors import NoticeError

import helpers

BLIP_TOKENS = ["[CLS]", "is", "the", "shape", "red", "or", "blue", "?", "[SEP]"]
BLIP_RECORD = {"tokens": BLIP_TOKENS, "question": [1, 8], "positions": [4], "first_piece": "red", "code_position": 3}
LAYERS, HEADS = 3, 4


def head_rows(pair_id: str, labels: list[str], planted: dict[tuple[int, int, int], float], task: str = "color",
              corruption: str = "image_smp", stream: str = "text", component: str = "cross_attn",
              seed: int = 0) -> list[dict]:
    """One pair's head rows at every position: p(correct) near 0.01, planted (position, layer, head) high."""
    rng = np.random.default_rng(seed)
    rows = []
    for position, token in enumerate(labels):
        for layer in range(LAYERS):
            for head in range(HEADS):
                p = planted.get((position, layer, head), 0.01 + rng.uniform(0, 0.002))
                rows.append(dict(pair_id=pair_id, task=task, corruption=corruption,
                                 modality=corruption.split("_")[0], direction="denoise", stream=stream, layer=layer,
                                 component=component, head=head, position=position, token=token, p_correct=p,
                                 normalized_effect=p, flags=""))
    return rows


def table_of(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).astype({"head": "Int64", "position": "Int64"})


def important(rankings: dict[str, pd.DataFrame], condition: str) -> set[tuple[int, int]]:
    ranked = rankings[condition]
    return {(int(r.layer), int(r.head)) for r in ranked[ranked["important"]].itertuples()}


# a head at the answer word, another at the token before it, a third strongest at "?"
PLANTED = {(4, 1, 2): 0.6, (3, 0, 3): 0.6, (7, 2, 0): 0.9}


@pytest.fixture()
def blip_table() -> pd.DataFrame:
    return table_of([row for s in range(6) for row in head_rows(f"p{s}", BLIP_TOKENS, PLANTED, seed=s)])


def test_notice_rule_picks_the_head_at_the_answer_word(blip_table):
    records = {f"p{s}": BLIP_RECORD for s in range(6)}
    rankings, coverage = pr.rank_by_rule(blip_table, records, "text", "cross_attn", "notice")
    assert important(rankings, "color/image/smp") == {(1, 2)}
    assert set(coverage["position"]) == {4} and (coverage["reason"] == "").all()
    ranked = rankings["color/image/smp"]
    assert ranked.iloc[0]["mean_abs_score"] == pytest.approx(0.6)
    values = ranked["mean_abs_score"].to_numpy()
    assert ranked.attrs["threshold"] == pytest.approx(values.mean() + 2 * values.std())
    # our default rule reads each head at its strongest position and so names all three
    default = rank_by_condition(blip_table, "text", "cross_attn")
    assert {(r.layer, r.head) for r in default["color/image/smp"].head(3).itertuples()} == {(1, 2), (0, 3), (2, 0)}


def test_code_variant_reads_the_token_before_the_answer_word(blip_table):
    records = {f"p{s}": BLIP_RECORD for s in range(6)}
    rankings, coverage = pr.rank_by_rule(blip_table, records, "text", "cross_attn", "notice-code")
    assert set(coverage["position"]) == {3}  # "shape", one before "red"
    assert important(rankings, "color/image/smp") == {(0, 3)}


def test_pairs_the_rule_cannot_score_are_counted_with_their_reason():
    records = {
        "ok": BLIP_RECORD,
        "yes-no": {"tokens": ["[CLS]", "is", "there", "a", "red", "shape", "?", "[SEP]"], "question": [1, 7],
                   "positions": [], "first_piece": "yes", "code_position": None},
        "split": dict(BLIP_RECORD, first_piece="re"[::-1]),  # the answer alone splits unlike in the question
        "other-tokenizer": dict(BLIP_RECORD, tokens=["[CLS]", "is", "this", "shape", "red", "or", "blue", "?",
                                                     "[SEP]"]),
    }
    yes_no_labels = records["yes-no"]["tokens"]
    rows = head_rows("ok", BLIP_TOKENS, PLANTED) + head_rows("yes-no", yes_no_labels, {})
    rows += head_rows("split", BLIP_TOKENS, PLANTED) + head_rows("other-tokenizer", BLIP_TOKENS, PLANTED)
    rows += head_rows("no-record", BLIP_TOKENS, PLANTED)
    unpatched = head_rows("unpatched", BLIP_TOKENS, PLANTED)  # heads everywhere but at the answer word
    rows += [r for r in unpatched if r["position"] != 4] + [dict(r, component="layer", head=pd.NA) for r in unpatched]
    rows += [r for r in head_rows("sparse", BLIP_TOKENS, PLANTED) if r["position"] == 4]  # e.g. a one-position sweep
    records.update(unpatched=BLIP_RECORD, sparse=BLIP_RECORD)
    table = table_of(rows)
    rankings, coverage = pr.rank_by_rule(table, records, "text", "cross_attn", "notice")
    reasons = dict(zip(coverage["pair_id"], coverage["reason"]))
    assert reasons["ok"] == ""
    assert reasons["yes-no"] == "answer word not in the question"
    assert reasons["split"] == "the tokenizer splits the answer word differently in the question"
    assert reasons["other-tokenizer"].startswith("the question's tokens are not among the results' positions")
    assert reasons["no-record"].startswith("no answer-token record")
    assert reasons["unpatched"] == "heads not patched at position 4"
    assert reasons["sparse"].startswith("the question's tokens are not among the results' positions")
    counts = pr.coverage_counts(coverage).iloc[0]
    assert (counts["pairs"], counts["scored"], counts["unscored"]) == (7, 1, 6)
    assert "answer word not in the question (1)" in counts["why unscored"]
    assert rankings["color/image/smp"]["pairs"].max() == 1  # only the scored pair counts
    code = dict(pr.rank_by_rule(table, records, "text", "cross_attn", "notice-code")[1][["pair_id", "reason"]].values)
    assert code["yes-no"] == "no question token contains the answer's first wordpiece"


def test_causal_lm_reads_the_answer_word_s_last_token_after_the_template():
    # the question tokenized alone, and inside a chat template after image tokens
    alone = ["<s>", "▁is", "▁the", "▁shape", "▁te", "al", "▁or", "▁blue?"]
    record = {"tokens": alone, "question": [1, 8], "positions": [4, 5], "first_piece": "▁te", "code_position": 3}
    labels = ["<s>", "▁USER:", "▁", "<image patch 0,0>", "<image patch 0,1>", "\n"] + alone[1:] + ["▁ASSISTANT:"]
    planted = {(10, 2, 1): 0.7, (9, 0, 0): 0.7}  # "al" at 5 + 5, "▁te" at 4 + 5
    table = table_of([r for s in range(4) for r in head_rows(f"p{s}", labels, planted, stream="lm",
                                                             component="self_attn", seed=s)])
    records = {f"p{s}": record for s in range(4)}
    for rule in ("notice", "notice-code"):  # the research code patches LLaVA's heads at that token too
        rankings, coverage = pr.rank_by_rule(table, records, "lm", "self_attn", rule)
        assert set(coverage["position"]) == {10}
        assert important(rankings, "color/image/smp") == {(2, 1)}


def test_important_is_at_or_above_the_threshold_and_universal_needs_every_condition():
    rows = []
    for task in ("color", "shape"):
        for corruption in ("image_smp", "text_str"):
            planted = {(4, 1, 2): 0.6} if (task, corruption) != ("shape", "text_str") else {(4, 0, 0): 0.6}
            rows += [r for s in range(3) for r in head_rows(f"{task}-{corruption}-{s}", BLIP_TOKENS, planted,
                                                            task, corruption, seed=s)]
    table = table_of(rows)
    records = {pair_id: BLIP_RECORD for pair_id in table["pair_id"].unique()}
    rankings, _ = pr.rank_by_rule(table, records, "text", "cross_attn", "notice")
    assert set(rankings) == {"color/image/smp", "color/text/str", "shape/image/smp", "shape/text/str"}
    sets = pr.head_sets(rankings)
    assert sets["universal"] == set() and sets["shape/text/str"] == {"L0H0"}
    assert pr.head_sets(rankings, min_conditions=3)["universal"] == {"L1H2"}
    flat = pr.important_heads(pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "score": [0.5, 0.5, 0.5]}))
    assert flat["important"].all()  # equal scores meet mean + 2σ exactly: the research code's >=


def test_rules_side_by_side_show_overlap_and_what_only_one_rule_names():
    sets = {"default": {"color/image": {"L1H2", "L2H0"}, "universal": {"L1H2"}},
            "notice": {"color/image": {"L1H2", "L0H3"}, "universal": set()}}
    frame = pr.compare_rules(sets).set_index("condition")
    assert frame.loc["color/image", "in every rule"] == "L1H2"
    assert frame.loc["color/image", "only default"] == "L2H0" and frame.loc["color/image", "only notice"] == "L0H3"
    assert frame.loc["universal", "default"] == "L1H2" and frame.loc["universal", "notice"] == "–"


def test_every_corruption_is_a_condition_of_its_own_even_alone_in_its_modality():
    rows = head_rows("a", BLIP_TOKENS, {}, corruption="text_str") + head_rows("b", BLIP_TOKENS, {}, "color",
                                                                            "text_str_both")
    rows += head_rows("c", BLIP_TOKENS, {}, corruption="image_smp") + head_rows("d", BLIP_TOKENS, {}, "shape",
                                                                              "text_str")
    table = table_of(rows)
    assert dict(zip(table["pair_id"], condition_labels(table))) == {
        "a": "color/text/str", "b": "color/text/str_both", "c": "color/image/smp", "d": "shape/text/str"}


def test_directions_are_never_pooled(blip_table):
    both = pd.concat([blip_table, blip_table.assign(direction="noise", p_correct=0.5)], ignore_index=True)
    records = {f"p{s}": BLIP_RECORD for s in range(6)}
    rankings, _ = pr.rank_by_rule(both, records, "text", "cross_attn", "notice")
    assert set(rankings) == {"color/image/smp/denoise", "color/image/smp/noise"}
    assert important(rankings, "color/image/smp/denoise") == {(1, 2)}


def test_unknown_rules_are_refused_in_one_line():
    assert pr.check_rules(["notice,default", "notice-code"]) == ["default", "notice", "notice-code"]
    with pytest.raises(NoticeError, match="unknown head-selection rule.*paper.*use default, notice, notice-code"):
        pr.check_rules(["paper"])


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_rule_places_the_answer_word_in_tables_patched_from_real_models(family, request, tmp_path):
    """Pairs built with the model's tokenizer, every head patched at every position: the recorded
    question is found in the table's labels (after LLaVA's chat template and image tokens)."""
    from notice.pairs import read_pairs
    from notice.patching.engine import patch_pair
    from notice.tasks import build_pairs

    adapter = request.getfixturevalue(f"tiny_{family}")
    stream, component = ("text", "cross_attn") if family == "blip" else ("lm", "self_attn")
    build_pairs("easyvqa-color", tmp_path / "p.parquet", adapter.tokenizer, limit=1, corruptions=["image_smp"])
    pairs = read_pairs(tmp_path / "p.parquet")
    table = pd.concat([patch_pair(adapter, pair, [f"{stream}.*.{component}.head*"], checks=False) for pair in pairs])
    records = pr.answer_records(pairs)
    notice = pr.rank_by_rule(table, records, stream, component, "notice")[1].set_index("pair_id")
    code = pr.rank_by_rule(table, records, stream, component, "notice-code")[1].set_index("pair_id")
    assert (notice["reason"] == "").all() and (code["reason"] == "").all()
    for pair in pairs:
        tokens = adapter.tokenize(pair.clean_prompt)  # what the stream's positions index
        record = records[pair.id]
        position = int(notice.loc[pair.id, "position"])
        if family == "blip":
            assert tokens[position] == record["first_piece"] and position == record["positions"][0]
            assert int(code.loc[pair.id, "position"]) == position - 1
        else:  # the answer word's last token, after the image tokens; the research code reads it too
            ids = adapter.prepare([helpers.shape_image(32)], [pair.clean_prompt]).input_ids[0]
            assert position > int(adapter.image_positions(ids)[-1])
            assert tokens[position] == record["tokens"][record["positions"][-1]]
            assert int(code.loc[pair.id, "position"]) == position


def test_records_made_by_real_tokenizers_say_when_the_answer_is_absent():
    from notice.tasks.common import answer_token_record

    bert = helpers.blip_processor(32).tokenizer
    yes_no = answer_token_record(bert, "is there a red shape?", None, "yes")
    assert yes_no["positions"] == [] and yes_no["code_position"] is None
    positions = pr.rule_positions(table_of(head_rows("q", yes_no["tokens"], {})), {"q": yes_no}, "text", "notice")
    assert positions.loc[0, "reason"] == "answer word not in the question"
    llama = helpers.llava_tokenizer()
    prompt = "is the shape red or blue?"
    record = answer_token_record(llama, prompt, (13, 16), "red")
    assert record["tokens"][0] == "<s>" and record["question"] == [1, len(record["tokens"])]
    assert record["first_piece"] in record["tokens"][record["positions"][0]]
    assert record["code_position"] == record["positions"][0] - 1  # <s> plays [CLS]'s part
