"""The HTML report: built from a table, self-contained, and rendered by a real browser."""

from __future__ import annotations

import json
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
from notice.report.build import ModelResults, make_report
from results_fixtures import synthetic_table


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


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_blip):
    folder = tmp_path_factory.mktemp("report")
    table = synthetic_table({"color/image": [(1, 1)], "color/text": [(1, 1), (0, 2)]}, layers=2, heads=4)
    table["p_correct"] = table["normalized_effect"]
    pairs = _pairs_with_masks(folder)  # no answer-token records: the paper's rule lists every pair as unscored
    functions = read_head_functions(write_head_functions(tiny_blip, pairs, folder / "head_functions"))
    make_report([ModelResults("tiny", table, functions, pairs, {"pairs.parquet": {"kept": 2, "dropped: clean_wrong": 3}})],
                folder / "out", "test report", rules=("default", "notice"))
    return folder / "out"


def test_report_holds_heatmaps_rankings_universal_heads_and_overlays(report_dir):
    page = (report_dir / "index.html").read_text()
    for heading in ("Tasks and selection", "color/image", "color/text", "Universal heads", "What the heads do",
                    "Head-selection rules (default, notice)", "Rules side by side"):
        assert heading in page
    assert "L1H1" in page  # the planted head is universal across both conditions
    figures = {p.name for p in (report_dir / "figures").iterdir()}
    assert {"color-image-text-layer.png", "color-image-text-layer.pdf", "color-image-text-heads.png"} <= figures
    assert any(name.startswith("overlay-") for name in figures)
    assert (report_dir / "plotly.min.js").stat().st_size > 1_000_000  # bundled, no network needed
    assert "https://" not in page.split("<body>")[0]
    assert json.loads((report_dir / "report.json").read_text())["sections"][0] == "Tasks and selection"


def test_report_renders_in_headless_chromium_without_console_errors(report_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
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
        driver.get((report_dir / "index.html").resolve().as_uri())
        page = (report_dir / "index.html").read_text()
        expected_plots = page.count("Plotly.newPlot(")
        # plotly draws after the page loads: wait for every plot and image rather than racing them
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && [...document.images].every(i => i.complete)"
            " && document.querySelectorAll('div.js-plotly-plot .main-svg').length >= arguments[0]", expected_plots))
        plots = driver.find_elements(By.CSS_SELECTOR, "div.js-plotly-plot .main-svg")
        images = driver.find_elements(By.TAG_NAME, "img")
        loaded = [driver.execute_script("return arguments[0].naturalWidth", img) for img in images]
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert not errors, errors
    assert expected_plots >= 4 and len(plots) >= expected_plots  # interactive heatmaps drawn by the bundled plotly
    assert images and all(width > 0 for width in loaded)
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
        ("color/image", 1, 1), ("color/text", 1, 1), ("color/text", 0, 2)}


def test_paper_rule_without_pairs_is_refused_before_anything_is_written(tmp_path):
    table = synthetic_table({"color/image": [(1, 1)]}, layers=2, heads=4)
    with pytest.raises(NoticeError, match="--rule notice reads where each answer word sits from the pairs"):
        make_report([ModelResults("tiny", table)], tmp_path / "out", "rules", rules=["notice"])
    with pytest.raises(NoticeError, match="unknown head-selection rule"):
        make_report([ModelResults("tiny", table)], tmp_path / "out", "rules", rules=["best"])
    assert not (tmp_path / "out").exists()
