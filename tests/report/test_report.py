"""The HTML report: built from a table, self-contained, and rendered by a real browser."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import helpers
from notice.analysis.head_functions import read_head_functions, write_head_functions
from notice.errors import NoticeError
from notice.pairs import Pair
from notice.report.build import ModelResults, focus_of, make_report
from results_fixtures import lm_table, synthetic_table


def _pairs_with_masks(folder: Path, count: int = 2) -> list[Pair]:
    pairs = []
    for i in range(count):
        image = helpers.shape_image(32, box=(8, 8, 24, 24))
        image_path, mask_path = folder / f"img{i}.png", folder / f"mask{i}.png"
        image.save(image_path)
        mask = (np.asarray(image)[..., 1] < 100).astype(np.uint8) * 255  # the red shape
        Image.fromarray(mask).save(mask_path)
        pairs.append(Pair(f"p{i}", "color", "image_smp", str(image_path), str(image_path), "is the shape red or blue?",
                          "is the shape red or blue?", "red", "blue", {"clean_mask": str(mask_path)}))
    return pairs


# SMP and its Gaussian-noise baseline on the same task and modality, planted on different heads; STR with
# too few pairs; text noise asked for but never kept. The MLP's effects are 10^4 times smaller than the rest.
CONDITIONS = {"color/image": [(1, 1)], "color/image/image_noise": [(0, 3)], "color/text": [(1, 1), (0, 2)]}
SAMPLES = {"color/image": 20, "color/image/image_noise": 20, "color/text": 8}
SELECTION = {"color": {"settings": {"max_per_cell": 1}, "by_corruption": {
    "image_smp": {"input": 60, "kept": 20, "balance": 38, "clean_wrong": 2},
    "image_noise": {"input": 60, "kept": 20, "balance": 40},
    "text_str": {"input": 60, "kept": 8, "no_flip": 50, "clean_wrong": 2},
    "text_noise": {"input": 60, "kept": 0, "no_flip": 60}}}}


def report_table() -> pd.DataFrame:
    table = pd.concat([synthetic_table({name: heads}, samples=SAMPLES[name], layers=2, heads=4, seed=i)
                       for i, (name, heads) in enumerate(CONDITIONS.items())], ignore_index=True)
    mlp = table["component"] == "mlp"
    table.loc[mlp, "normalized_effect"] *= 1e-4
    table["p_correct"] = table["normalized_effect"]
    return table


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_blip):
    folder = tmp_path_factory.mktemp("report")
    pairs = _pairs_with_masks(folder)  # no answer-token records: the paper's rule lists every pair as unscored
    functions = read_head_functions(write_head_functions(tiny_blip, pairs, folder / "head_functions"))
    make_report([ModelResults("tiny", report_table(), functions, pairs, SELECTION)], folder / "out", "test report",
                rules=("default", "notice"))
    return folder / "out"


def test_report_opens_with_a_summary_of_what_was_done_and_found(report_dir):
    page = (report_dir / "index.html").read_text()
    summary = page[page.index('<section class="summary"'):page.index("</section>")]
    for expected in ("What was done", "denoise: clean activations patched into the corrupted run", "Metric",
                     "(LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)", "Findings", "Conditions",
                     "Strongest module and head per condition", "Universal heads", "Tables (CSV)",
                     "Semantic Minimal Pairs (image_smp)", "Gaussian noise (baseline) (image_noise)"):
        assert expected in summary, expected
    facts = json.loads((report_dir / "report.json").read_text())["summary"]
    assert facts["models"] == ["tiny"] and facts["tasks"] == ["color"] and facts["direction"] == ["denoise"]
    status = {c["condition"]: (c["analysed"], c["status"]) for c in facts["conditions"]}
    assert status == {"color/image/smp": (20, "ok"), "color/image/noise": (20, "ok"),
                      "color/text/str": (8, "too few pairs (< 20)"), "color/text/noise": (0, "no pairs")}
    findings = " ".join(facts["findings"])
    assert "under Gaussian noise against" in findings and "under Semantic Minimal Pairs" in findings
    assert "Of 4 conditions, 1 condition has fewer than 20 pairs and 1 condition has none" in findings


def test_noise_and_smp_rows_are_reported_as_separate_conditions(report_dir):
    strongest = pd.read_csv(report_dir / "tables" / "strongest.csv").set_index("condition")
    assert strongest.loc["color/image/smp", "head"] == "L1H1" and strongest.loc["color/image/noise", "head"] == "L0H3"
    assert strongest.loc["color/image/smp", "head_mean_abs"] > 0.7  # pooled with noise it would halve
    ranking = pd.read_csv(report_dir / "tables" / "head_ranking.csv")
    assert set(ranking["condition"]) == {"color/image/smp", "color/image/noise", "color/text/str"}
    assert (ranking.groupby("condition")["samples"].max().to_dict()
            == {"color/image/smp": 20, "color/image/noise": 20, "color/text/str": 8})
    means = pd.read_csv(report_dir / "tables" / "module_means.csv")
    assert set(means["corruption"]) == {"image_smp", "image_noise", "text_str"} and (means["count"] <= 20).all()
    # as plotly's JSON writes "/" and a title's line break
    page = (report_dir / "index.html").read_text().replace("\\u002f", "/").replace("\\u003cbr\\u003e", " ")
    assert "Semantic Minimal Pairs (color/image/smp, n=20)" in page
    assert "Gaussian noise (baseline) (color/image/noise, n=20)" in page


def test_every_condition_shows_its_pairs_or_the_reason_it_has_too_few(report_dir):
    page = (report_dir / "index.html").read_text()
    assert 'data-condition="color/text/noise"' in page
    assert "0 of 60 kept; dropped: 60 no_flip" in page
    assert "8 pairs, too few pairs (&lt; 20): 8 of 60 kept; dropped: 50 no_flip, 2 clean_wrong" in page
    assert "no_flip: the corruption does not flip the model&#x27;s answer" in page  # what each filter means
    conditions = pd.read_csv(report_dir / "tables" / "conditions.csv", keep_default_na=False)
    assert list(conditions["condition"]) == ["color/image/smp", "color/image/noise", "color/text/str",
                                             "color/text/noise"]


def test_figures_appear_once_with_static_files_linked_and_captions_that_say_what_cells_hold(report_dir):
    page = (report_dir / "index.html").read_text()
    report = json.loads((report_dir / "report.json").read_text())
    ids = [f["id"] for f in report["figures"]]
    assert sorted(ids) == ["color-image-heads", "color-image-modules", "color-text-heads", "color-text-modules"]
    for figure in report["figures"]:
        assert page.count(f'data-figure="{figure["id"]}"') == 1 and page.count(f'id="{figure["id"]}"') == 1
        assert [Path(f).suffix for f in figure["files"]] == [".png", ".pdf"]
        for file in figure["files"]:
            assert (report_dir / file).stat().st_size > 1000 and f'href="{file}"' in page
    assert "<img" not in page.replace('<img src="figures/overlay-', "")  # only overlays are images
    modules = next(f["caption"] for f in report["figures"] if f["id"] == "color-image-modules")
    assert "Each cell: the mean over the condition's pairs of the normalized effect" in modules
    assert re.search(r"text MLP ±[0-9.e-]+ \(1/[0-9,]+ of the largest\)", modules)  # marked, not hidden
    heads = next(f["caption"] for f in report["figures"] if f["id"] == "color-image-heads")
    assert "|normalized effect| at the token where it is largest" in heads and "the rankings below sort by" in heads


def test_every_table_is_a_csv_linked_from_the_page_and_listed_in_report_json(report_dir):
    page = (report_dir / "index.html").read_text()
    tables = json.loads((report_dir / "report.json").read_text())["tables"]
    assert {"conditions", "strongest", "module_means", "head_ranking", "universal_heads", "head_functions",
            "selection", "heads-notice", "pairs-notice"} <= set(tables)
    for entry in tables.values():
        frame = pd.read_csv(report_dir / entry["path"])
        assert len(frame) == entry["rows"] and f'href="{entry["path"]}"' in page and entry["description"]
    ranking = pd.read_csv(report_dir / tables["head_ranking"]["path"])
    assert {"ci_low", "ci_high", "mean_abs_effect", "important", "model"} <= set(ranking.columns)
    assert (ranking["ci_low"] <= ranking["mean_abs_effect"]).all()
    functions = pd.read_csv(report_dir / tables["head_functions"]["path"])
    assert {"mask_iou", "object_inhibition", "head_name"} <= set(functions.columns)
    assert len(functions) == len(functions[["layer", "head"]].drop_duplicates()) == 2 * 4  # every head of the tiny BLIP


def test_overlays_name_the_image_question_answer_and_head(report_dir):
    page = (report_dir / "index.html").read_text()
    captions = re.findall(r'<div class="overlays">.*?</div>', page, re.S)[0]
    assert "L1H1 on the clean image of pair p0 (color/image/smp): question “is the shape red or blue?”, answer " \
           "“red” (contrast “blue”)" in captions
    assert all((report_dir / "figures" / name).is_file() for name in re.findall(r'src="figures/([^"]+)"', captions))


def _open_in_chromium(page: Path):
    """Headless chromium on `page`, once every plot and image is drawn; the caller quits the driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium's driver is missing: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,2400"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.resolve().as_uri())
        # plotly draws after the page loads: wait for every plot and image rather than racing them
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && [...document.images].every(i => i.complete)"
            " && document.querySelectorAll('div.js-plotly-plot .main-svg').length > 0"
            " && document.querySelectorAll('figure.plot div.js-plotly-plot').length"
            " === document.querySelectorAll('figure.plot').length"))
    except BaseException:
        driver.quit()
        raise
    return driver


def test_report_renders_in_headless_chromium_with_summary_conditions_figures_and_tables(report_dir, tmp_path):
    from selenium.webdriver.common.by import By

    report = json.loads((report_dir / "report.json").read_text())
    driver = _open_in_chromium(report_dir / "index.html")
    try:
        summary = driver.find_element(By.ID, "summary")
        summary_text = summary.text
        summary_top = summary.location["y"]
        first_section = driver.find_element(By.CSS_SELECTOR, "h2[id^='s']").location["y"]
        condition_items = {e.get_attribute("data-condition"): e.text
                           for e in driver.find_elements(By.CSS_SELECTOR, "[data-condition]")}
        figure_ids = [e.get_attribute("data-figure") for e in driver.find_elements(By.CSS_SELECTOR, "figure.plot")]
        drawn = len(driver.find_elements(By.CSS_SELECTOR, "figure.plot div.js-plotly-plot"))
        images = [img.get_attribute("src") for img in driver.find_elements(By.TAG_NAME, "img")]
        loaded = [driver.execute_script("return arguments[0].naturalWidth", img)
                  for img in driver.find_elements(By.TAG_NAME, "img")]
        links = {a.get_attribute("href").split("/report/")[-1] for a in driver.find_elements(By.TAG_NAME, "a")
                 if a.get_attribute("href")}
        heads_z = driver.execute_script(  # the values plotly drew, decoded from its typed arrays
            "return document.getElementById('color-image-heads')._fullData[0].z.map(row => Array.from(row))")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert not errors, errors
    assert summary_top < first_section and "Findings" in summary_text and "Strongest module and head" in summary_text
    conditions = pd.read_csv(report_dir / "tables" / "conditions.csv", keep_default_na=False)
    assert set(condition_items) == set(conditions["condition"])  # every condition, with pairs or a reason
    for row in conditions.itertuples():
        assert (f"{row.analysed} pairs" in condition_items[row.condition]
                and (row.status == "ok" or row.reason in condition_items[row.condition]))
    assert len(figure_ids) == len(set(figure_ids)) == len(report["figures"]) == drawn  # each figure once
    assert images and all(src.split("/")[-1].startswith("overlay-") for src in images) and all(loaded)
    for entry in report["tables"].values():
        assert any(link.endswith(entry["path"]) for link in links), entry["path"]
    for figure in report["figures"]:
        assert all(any(link.endswith(f) for link in links) for f in figure["files"])
    # the head heatmap shows the ranking's statistic: mean |effect| per head
    ranking = pd.read_csv(report_dir / "tables" / "head_ranking.csv")
    smp = ranking[ranking["condition"] == "color/image/smp"].pivot(index="layer", columns="head",
                                                                   values="mean_abs_effect")
    np.testing.assert_allclose(np.array(heads_z, dtype=float), smp.to_numpy(), rtol=1e-6)
    assert screenshot.stat().st_size > 10_000


def test_paper_rule_section_lists_its_heads_beside_the_default_and_counts_unscored_pairs(tmp_path):
    table = synthetic_table({"color/image": [(1, 1)], "color/text": [(1, 1), (0, 2)]}, layers=3, heads=4)
    table["p_correct"] = table["normalized_effect"]  # planted heads sit at position 2, token "t2"
    record = {"tokens": [f"t{i}" for i in range(5)], "question": [1, 4], "positions": [2], "first_piece": "t2",
              "code_position": 1}
    ids = sorted(set(table["pair_id"]) - {"color-text-0"})  # one pair from before the record existed
    pairs = [Pair(i, "color", "image_smp", "a.png", "a.png", "q", "q", "t2", "t3", {"answer_tokens": record})
             for i in ids]
    make_report([ModelResults("tiny", table, None, pairs)], tmp_path / "out", "rules", rules=["notice", "default"])
    page = (tmp_path / "out" / "index.html").read_text()
    section = page[page.index("Head-selection rules (default, notice)"):]
    assert "Rule notice: mean |p(correct)|" in section and "Rules side by side" in section
    assert "no answer-token record in the pairs" in section and "color-text-0" in section
    coverage = pd.read_csv(tmp_path / "out" / "tables" / "pairs-notice.csv")
    assert coverage["reason"].notna().sum() == 1 and len(coverage) == 24
    heads = pd.read_csv(tmp_path / "out" / "tables" / "heads-notice.csv")
    chosen = heads[heads["important"]]
    assert set(zip(chosen["condition"], chosen["layer"], chosen["head"])) == {
        ("color/image/smp", 1, 1), ("color/text/str", 1, 1), ("color/text/str", 0, 2)}


def test_paper_rule_without_pairs_is_refused_before_anything_is_written(tmp_path):
    table = synthetic_table({"color/image": [(1, 1)]}, layers=2, heads=4)
    with pytest.raises(NoticeError, match="--rule notice reads where each answer word sits from the pairs"):
        make_report([ModelResults("tiny", table)], tmp_path / "out", "rules", rules=["notice"])
    with pytest.raises(NoticeError, match="unknown head-selection rule"):
        make_report([ModelResults("tiny", table)], tmp_path / "out", "rules", rules=["best"])
    assert not (tmp_path / "out").exists()


def test_attribution_estimates_with_verified_cells_are_read_as_the_estimates_and_named(tmp_path):
    estimates = synthetic_table({"color/image": [(1, 1)]}, samples=6, layers=2, heads=4)
    estimates = estimates.assign(method="atp*", score=estimates["normalized_effect"].abs())
    planted = estimates[estimates["head"].notna() & (estimates["layer"] == 1) & (estimates["head"] == 1)]
    verified = planted.assign(method="exact", normalized_effect=planted["normalized_effect"] * 10)  # told apart
    make_report([ModelResults("tiny", pd.concat([estimates, verified], ignore_index=True))], tmp_path / "out", "atp")
    strongest = pd.read_csv(tmp_path / "out" / "tables" / "strongest.csv").iloc[0]
    assert strongest["head"] == "L1H1" and 0.7 < strongest["head_mean_abs"] < 0.9  # the estimate alone
    facts = json.loads((tmp_path / "out" / "report.json").read_text())["summary"]
    assert facts["method"] == ["atp*"]
    assert "tiny: the strongest text cross-attention head is L1H1 in color/image/smp (0.8" in " ".join(facts["findings"])
    assert "Attribution patching (AtP*)" in (tmp_path / "out" / "index.html").read_text()


def test_overlays_take_their_pairs_from_each_condition_in_turn():
    from notice.report.sections import _varied

    def pair(i: str, corruption: str) -> Pair:
        return Pair(i, "color", corruption, "a.png", "a.png", "q", "q", "red", "blue")

    pairs = [pair("s0", "image_smp"), pair("s1", "image_smp"), pair("s2", "image_smp"), pair("n0", "image_noise")]
    assert _varied(pairs, 2) == ["s0", "n0"] and _varied(pairs, 3) == ["s0", "n0", "s1"]
    assert _varied([], 2) == []


# three generations side by side, shaped as the tiny test models: BLIP's text cross-attention, an image-token
# LM's self-attention, and a language model with cross-attention on layers 1 and 2 only (self-attention on 0
# and 3), as mllama's
FAMILY_PLANTS = {"blip": (1, 1), "llava": (0, 2), "mllama": (2, 3)}


def family_tables() -> dict[str, pd.DataFrame]:
    conditions = lambda head: {"color/image": [head], "color/text": [head]}  # noqa: E731
    return {"blip": synthetic_table(conditions(FAMILY_PLANTS["blip"]), layers=2, heads=4, seed=1),
            "llava": pd.concat([lm_table(conditions(FAMILY_PLANTS["llava"]), layers=3, heads=6, seed=2),
                                lm_table({"color/image/image_noise": [(2, 5)]}, layers=3, heads=6, seed=3)],
                               ignore_index=True),  # a noise baseline on LLaVA only
            "mllama": lm_table(conditions(FAMILY_PLANTS["mllama"]), cross_layers=(1, 2), seed=4)}


def test_heads_in_focus_are_where_each_family_meets_the_image_read_from_the_table():
    tables = family_tables()
    assert focus_of(tables["blip"]) == ("text", "cross_attn")
    assert focus_of(tables["llava"]) == ("lm", "self_attn")
    assert focus_of(tables["mllama"]) == ("lm", "cross_attn")  # though self-attention heads are patched too
    qformer = tables["blip"].assign(stream="qformer")
    both = pd.concat([qformer, tables["llava"]], ignore_index=True)  # BLIP-2: Q-Former cross-attention, LM self
    assert focus_of(both) == ("qformer", "cross_attn")
    decoder = tables["blip"].assign(stream="decoder")  # BLIP's answer decoder cross-attends the text, not the image
    assert focus_of(pd.concat([decoder, tables["llava"]], ignore_index=True)) == ("lm", "self_attn")


def test_family_comparison_sets_three_families_heads_side_by_side_with_absent_layers_blank(tmp_path):
    from notice.report.build import analyse
    from notice.report.sections import _focus_panel

    models = [ModelResults(name, table) for name, table in family_tables().items()]
    make_report(models, tmp_path / "out", "three families")
    out = tmp_path / "out"
    page = (out / "index.html").read_text()
    section = html.unescape(page[page.index(">Families compared</h2>"):page.index(">Selection counts</h2>")])
    # the shared conditions are compared; the noise baseline only LLaVA has is named, not compared
    assert re.findall(r'data-comparison="([^"]+)"', section) == ["color/image/smp", "color/text/str"]
    assert "in one model only, not compared: color/image/noise" in section
    report = json.loads((out / "report.json").read_text())
    compared = [f for f in report["figures"] if f["id"].startswith("compare-")]
    assert [f["id"] for f in compared] == ["compare-color-image-smp-heads", "compare-color-text-str-heads"]
    assert "absent rather than zero" in compared[0]["caption"] and "mean over the condition's pairs" in compared[0]["caption"]
    for figure in compared:
        assert all((out / f).stat().st_size > 1000 for f in figure["files"])
    # one panel per model, titled with its head kind, each on the model's whole depth
    analyses = [analyse(model) for model in models]
    panels = [_focus_panel(a, "color/image/smp") for a in analyses]
    assert [p.title for p in panels] == ["blip: text cross-attention heads (n=12)",
                                         "llava: lm self-attention heads (n=12)",
                                         "mllama: lm cross-attention heads (n=12)"]
    mllama = panels[2].values
    assert list(mllama.index) == [0, 1, 2, 3]
    assert mllama.loc[[0, 3]].isna().all().all() and mllama.loc[[1, 2]].notna().all().all()  # absent, not zero
    assert panels[1].values.notna().all().all()
    # each model's strongest heads with intervals, as CSV; the planted head leads each
    top = pd.read_csv(out / "tables" / "families_compared.csv")
    leaders = top[top["rank"] == 1].set_index(["condition", "model"])
    for name, (layer, head) in FAMILY_PLANTS.items():
        for condition in ("color/image/smp", "color/text/str"):
            assert tuple(leaders.loc[(condition, name), ["layer", "head"]]) == (layer, head)
    assert (top["ci_low"] <= top["mean_abs_effect"]).all() and (top["mean_abs_effect"] <= top["ci_high"]).all()
    assert set(top.groupby("model")["heads"].first().items()) == {
        ("blip", "text cross-attention"), ("llava", "lm self-attention"), ("mllama", "lm cross-attention")}
    # one sentence per condition from the numbers: where the strongest heads sit in each depth
    assert ("In color/image/smp the strongest head (mean |effect| [95% CI]) of blip's (text cross-attention) is "
            "L1H1 in layer 1 of 0–1") in section
    assert "mllama's (lm cross-attention) is L2H3 in layer 2 of 0–3" in section
    assert "relative depth 0.00 for llava up to 1.00 for blip" in section
    universal = pd.read_csv(out / "tables" / "families_universal.csv", keep_default_na=False).set_index("model")
    assert universal.loc["blip", "important (2σ) in ≥ k"] == "L1H1"
    assert universal.loc["mllama", "important (2σ) in ≥ k"] == "L2H3"
    assert universal.loc["llava", "conditions"] == 3  # its noise baseline counts for its own universality
    tables = report["tables"]
    assert {"families_compared", "families_universal"} <= set(tables)
    assert all(f'href="{tables[name]["path"]}"' in section for name in ("families_compared", "families_universal"))


@pytest.fixture(scope="module")
def families_dir(tmp_path_factory, tiny_blip, tiny_llava, tiny_mllama):
    """Three families' report: synthetic effects, head functions measured on the tiny models themselves."""
    folder = tmp_path_factory.mktemp("families")
    pairs = _pairs_with_masks(folder)
    adapters = {"blip": tiny_blip, "llava": tiny_llava, "mllama": tiny_mllama}
    models = [ModelResults(name, table, read_head_functions(write_head_functions(adapters[name], pairs,
                                                                                folder / f"hf-{name}")), pairs)
              for name, table in family_tables().items()]
    make_report(models, folder / "out", "three families")
    return folder / "out"


def test_family_comparison_renders_in_chromium_with_a_panel_per_family_csvs_and_overlays(families_dir):
    from selenium.webdriver.common.by import By

    report = json.loads((families_dir / "report.json").read_text())
    driver = _open_in_chromium(families_dir / "index.html")
    try:
        heading = driver.find_element(By.XPATH, "//h2[text()='Families compared']")
        compared = [e.get_attribute("data-comparison") for e in driver.find_elements(By.CSS_SELECTOR, "[data-comparison]")]
        panels = driver.execute_script(  # per trace: the panel's title, its rows as plotly drew them
            "const plot = document.getElementById('compare-color-image-smp-heads');"
            "return plot._fullData.map((trace, i) => ["
            "  plot._fullLayout.annotations[i].text, Array.from(trace.z, row => Array.from(row))]);")
        families = [e.get_attribute("data-family") for e in driver.find_elements(
            By.XPATH, "//h2[text()='Families compared']/following-sibling::div[@class='side'][1]/div")]
        links = {a.get_attribute("href").split("/out/")[-1] for a in driver.find_elements(By.TAG_NAME, "a")
                 if a.get_attribute("href")}
        overlays = [(driver.execute_script("return arguments[0].naturalWidth", figure.find_element(By.TAG_NAME, "img")),
                     figure.find_element(By.TAG_NAME, "figcaption").text)
                    for figure in driver.find_elements(By.CSS_SELECTOR, "[data-families] figure")]
        heading_text = heading.text
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert not errors, errors
    assert heading_text == "Families compared"
    assert compared == ["color/image/smp", "color/text/str"]
    assert [title.replace("<br>", " ") for title, _ in panels] == [
        "blip: text cross-attention heads (n=12)", "llava: lm self-attention heads (n=12)",
        "mllama: lm cross-attention heads (n=12)"]
    mllama = np.array([[np.nan if v is None else v for v in row] for row in panels[2][1]], dtype=float)
    assert mllama.shape == (4, 4) and np.isnan(mllama[[0, 3]]).all() and np.isfinite(mllama[[1, 2]]).all()
    ranking = pd.read_csv(families_dir / "tables" / "head_ranking.csv")
    blip = ranking[(ranking["model"] == "blip") & (ranking["condition"] == "color/image/smp")]
    np.testing.assert_allclose(np.array(panels[0][1], dtype=float),
                               blip.pivot(index="layer", columns="head", values="mean_abs_effect").to_numpy(), rtol=1e-6)
    assert families == ["blip", "llava", "mllama"]
    for name in ("families_compared", "families_universal", "families_head_functions"):
        assert report["tables"][name]["path"] in links, name
    functions = pd.read_csv(families_dir / "tables" / "families_head_functions.csv").set_index("model")
    assert list(functions["heads"]) == ["text cross-attention", "lm self-attention", "lm cross-attention"]
    assert functions.loc["mllama", "in focus"] == "L2H3"
    assert [caption.split(":")[0] for _, caption in overlays] == ["blip", "llava", "mllama"]
    assert all(width > 0 for width, _ in overlays)
    assert all("on the clean image of pair" in c and "question “" in c and "answer “" in c for _, c in overlays)


def test_figures_drawn_in_worker_processes_or_in_process_give_the_same_report(tmp_path, monkeypatch):
    import notice.report.figures as figures

    table = synthetic_table({"color/image": [(1, 1)]}, samples=6, layers=2, heads=4)
    folders = {}
    for cores in (1, 2):
        monkeypatch.setattr(figures, "_usable_cores", lambda cores=cores: cores)
        folders[cores] = tmp_path / f"cores-{cores}"
        make_report([ModelResults("tiny", table)], folders[cores], "cores")
    assert (folders[1] / "index.html").read_text() == (folders[2] / "index.html").read_text()
    assert "<!--notice-figure:" not in (folders[2] / "index.html").read_text()  # every placeholder filled
    pngs = sorted(p.name for p in (folders[1] / "figures").glob("*.png"))
    assert pngs == sorted(p.name for p in (folders[2] / "figures").glob("*.png")) and len(pngs) == 2
    for name in pngs:
        assert (folders[1] / "figures" / name).read_bytes() == (folders[2] / "figures" / name).read_bytes()
