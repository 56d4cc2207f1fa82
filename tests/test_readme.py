"""Every code block of README.md runs in the suite (or, where it cannot run here, is checked), so the
docs cannot rot.

The rule, block by block in README order, in one working folder, as a reader following the README:
- `.venv/bin/notice ARGS` lines run in process on the embedded models and must exit 0, with small
  inputs put in: `[...]` optional parts are left out; IMAGE is an easy-VQA test image; the SVO, MIT
  and FER data folders are fixtures in each dataset's real layout; `pairs` gets `--limit 8`, `patch`
  `--limit 2` and `evaluate` `--images 4` unless the line gives its own.
- Lines that cannot run here are checked instead: `run` of a config whose model is a hub id (no hub
  here) is loaded and validated with its data folder made; `train-default` trains for tens of
  minutes and rewrites the embedded model, so its `--help` must work.
- `make TARGET` lines: the Makefile defines the target (running one installs, or runs this suite).
- python blocks run as written.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from typer.testing import CliRunner

import dataset_fixtures
from notice.cli import app
from notice.models import EMBEDDED
from notice.pipeline import load_config

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SMALL = {"pairs": ["--limit", "8"], "patch": ["--limit", "2"], "evaluate": ["--images", "4"]}

runner = CliRunner()


def readme_blocks() -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in BLOCK.finditer((ROOT / "README.md").read_text())]


def shell_lines(block: str) -> list[list[str]]:
    """Commands of a bash block: continuations joined, comments and `[optional]` parts left out."""
    joined = block.replace("\\\n", " ")
    lines = [shlex.split(re.sub(r"\s\[[^\]]*\]", "", line), comments=True) for line in joined.splitlines()]
    return [words for words in lines if words]


def _workspace(folder: Path) -> dict[str, str]:
    """The README's data folders and image, made in `folder`; returns the placeholder substitutions."""
    from easy_vqa import get_test_image_paths

    dataset_fixtures.svo_probes(folder / "SVO")
    dataset_fixtures.mit_states(folder / "MIT")
    dataset_fixtures.facial_expressions(folder / "FER")
    shutil.copytree(ROOT / "configs", folder / "configs")
    image = folder / "shape.png"
    shutil.copyfile(get_test_image_paths()[0], image)
    return {"IMAGE": str(image)}


def _notice(args: list[str], placeholders: dict[str, str]) -> list[str] | None:
    """The arguments to run, or None for a command checked instead of run."""
    args = [placeholders.get(a, a) for a in args]
    verb = args[0]
    if verb == "train-default":
        return ["train-default", "--help"]
    if verb == "run" and load_config(_with_data_folders(Path(args[1]))).model not in EMBEDDED:
        return None  # loaded and validated: a hub model cannot be fetched here
    extra = SMALL.get(verb, [])
    return args + (extra if extra and extra[0] not in args else [])


def _with_data_folders(config: Path) -> Path:
    """Make the data folders a config names (empty: only their existence is checked when loading)."""
    import yaml

    for task in yaml.safe_load(config.read_text()).get("tasks", []):
        if isinstance(task, dict) and task.get("data"):
            (config.parent / task["data"]).mkdir(parents=True, exist_ok=True)
    return config


def test_every_code_block_of_the_readme_runs(tmp_path, monkeypatch):
    placeholders = _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    makefile = (ROOT / "Makefile").read_text()
    ran, checked, python = [], [], 0
    for number, (language, block) in enumerate(readme_blocks(), start=1):
        where = f"README.md code block {number}"
        if language == "python":
            exec(compile(block, where, "exec"), {"__name__": "readme"})
            python += 1
            continue
        if language != "bash":  # the pipeline diagram
            assert ".venv/bin" not in block and "make " not in block, f"{where} holds commands: mark it bash"
            continue
        for words in shell_lines(block):
            if words[0] == "make":
                assert re.search(rf"^{re.escape(words[1])}:", makefile, re.MULTILINE), f"{where}: no target {words[1]}"
                checked.append(words)
                continue
            assert words[0] == ".venv/bin/notice", f"{where}: no rule runs {shlex.join(words)}"
            args = _notice(words[1:], placeholders)
            if args is None:
                checked.append(words)
                continue
            result = runner.invoke(app, args)
            assert result.exit_code == 0, f"{where}: `notice {shlex.join(args)}` failed:\n{result.output}"
            ran.append(args[0])
    # what the rule above covers: if the README changes shape, this says so rather than passing on nothing
    assert python == 1 and {"pairs", "select", "patch", "report", "ask", "info", "evaluate"} <= set(ran)
    assert len(ran) >= 15 and len(checked) == 5  # make demo, make test, make model-card, run <hub config> twice
