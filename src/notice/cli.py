"""The `notice` command line: one verb per step of the pipeline, plus `demo`."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from notice import __version__
from notice import checks as check
from notice.errors import NoticeError
from notice.models import DEFAULT_MODEL
from notice.pairs import CORRUPTIONS, DEFAULT_CORRUPTIONS, STR_FORMS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find where and how vision-language models combine image and text (NOTICE).")
console = Console()
err_console = Console(stderr=True)

ModelOption = typer.Option(DEFAULT_MODEL, "--model", "-m",
                           help="Embedded model name, local folder, or hub id (e.g. Salesforce/blip-vqa-base).")
DeviceOption = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, ...")
DtypeOption = typer.Option("float32", "--dtype", help="float32 (default), bfloat16 or float16.")


def _fail(error: Exception) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def _boundary(interrupted: Callable[[], str] = lambda: "nothing was written") -> Iterator[None]:
    """Bad input → one line and exit 2; Ctrl-C → one line saying what is kept and exit 130."""
    from notice.patching.engine import SanityCheckError

    try:
        yield
    except (NoticeError, SanityCheckError) as error:
        _fail(error)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {interrupted()}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"notice {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    import logging

    # notice measures prompts against the model's limit and names those too long in one line of its own
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


@app.command()
def ask(image: Path = typer.Argument(..., help="Image file (PNG, JPEG)."),
        question: str = typer.Argument(..., help="Question about the image."),
        model: str = ModelOption, device: str = DeviceOption, dtype: str = DtypeOption,
        top: int = typer.Option(5, help="How many candidate answers to list.")) -> None:
    """Answer a question about an image and show the top candidate answers."""
    with _boundary():
        import torch

        from notice.io import load_image
        from notice.models import load_model

        if not question.strip():
            raise NoticeError("empty question: ask something about the image, e.g. \"what color is the shape?\"")
        check.check_all([("--device", device, check.device), ("--dtype", dtype, check.dtype),
                         ("--top", top, check.whole(1))])
        picture = load_image(image)
        adapter = load_model(model, device=device, dtype=dtype)
        check.prompts_fit(adapter, [question], "ask a shorter question")
        answer = adapter.generate([picture], [question])[0]
        probs = torch.softmax(adapter.answer_logits([picture], [question])[0], dim=-1)
    console.print(f"[bold]{answer}[/]")
    values, ids = probs.topk(min(top, probs.numel()))
    table = Table("first answer token", "p", title="top candidates (first answer step)")
    for value, token in zip(values.tolist(), adapter.tokenizer.convert_ids_to_tokens(ids.tolist())):
        table.add_row(token, f"{value:.4f}")
    console.print(table)


@app.command()
def info(model: str = ModelOption, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show a model's streams, layers, heads, image tokens and site names."""
    from notice.models import load_model
    from notice.patching.sites import site_catalogue

    with _boundary():
        adapter = load_model(model)
    facts = adapter.describe()
    if as_json:
        facts["sites"] = site_catalogue(adapter.streams)
        typer.echo(json.dumps(facts, indent=2))
        return
    console.print(f"[bold]{facts['name']}[/] ({facts['family']}), {facts['image_tokens']} image tokens, "
                  f"vocabulary {facts['vocab_size']}")
    table = Table("stream", "layers", "heads", "head size", "width", "components", "positions", "what")
    for s in adapter.streams.values():
        table.add_row(s.name, str(s.layers), str(s.heads), str(s.head_dim), str(s.hidden),
                      ", ".join(s.components), s.positions, s.description)
    console.print(table)
    console.print("[bold]sites[/] (stream.layer.component[.headH]@position):")
    for line in site_catalogue(adapter.streams):
        console.print(f"  {line}", highlight=False)


@app.command()
def evaluate(model: str = ModelOption, split: str = typer.Option("test", help="easy-VQA split."),
             images: Optional[int] = typer.Option(None, help="Use only the first N images."),
             seed: int = typer.Option(0, help="Seed of the two-way choice questions."),
             out: Optional[Path] = typer.Option(None, help="Write the accuracies as JSON here.")) -> None:
    """Accuracy on easy-VQA per question kind (yes/no, colour, shape, two-way choice)."""
    from notice.evaluation import easy_vqa_accuracy

    with _boundary():
        check.check_all([("--split", split, check.one_of(("train", "test"), "split")),
                         ("--images", images, check.whole(1, optional=True))]
                        + ([("--out", out, check.output_file)] if out else []))
        result = easy_vqa_accuracy(model, split=split, limit_images=images, seed=seed)
    _print_accuracy(result)
    if out:
        from notice.io import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")


def _print_accuracy(result: dict) -> None:
    table = Table("question kind", "questions", "accuracy",
                  title=f"easy-VQA {result['split']}: {result['images']} images, {result['questions']} questions")
    for kind, accuracy in result["accuracy"].items():
        table.add_row(kind, str(result["counts"][kind]), f"{100 * accuracy:.2f}%")
    console.print(table)


@app.command("train-default")
def train_default(out: Optional[Path] = typer.Option(None, help="Output folder (default: the embedded model's)."),
                  family: str = typer.Option("blip", help="blip (the default model), llava (the tiny LLaVA) or "
                                                          "mllama (the tiny Llama-3.2-Vision)."),
                  seed: int = typer.Option(0, help="Seed of every random choice in the recipe."),
                  threads: int = typer.Option(2, help="torch CPU threads (1 is faster on a busy machine)."),
                  eval_each_epoch: bool = typer.Option(False, help="Report test accuracy after every epoch (blip).")) -> None:
    """Train an embedded model (small BLIP, tiny LLaVA or tiny Llama-3.2-Vision on easy-VQA) and write its
    model card."""
    from notice.models import EMBEDDED

    with _boundary():
        check.check_all([("--family", family, check.one_of(("blip", "llava", "mllama"), "family")),
                         ("--threads", threads, check.whole(1))]
                        + ([("--out", out, check.output_folder)] if out else []))
    out = out or EMBEDDED[f"easyvqa-{family}"]
    if family == "llava":
        from notice.training.card import write_llava_model_card
        from notice.training.default_llava import LlavaRecipe, train_default_llava

        summary = train_default_llava(out, LlavaRecipe(seed=seed, threads=threads), log=console.print)
        write_llava_model_card(out, summary, log=console.print)
        return
    if family == "mllama":
        from notice.training.card import write_mllama_model_card
        from notice.training.default_mllama import MllamaRecipe, train_default_mllama

        summary = train_default_mllama(out, MllamaRecipe(seed=seed, threads=threads), log=console.print)
        write_mllama_model_card(out, summary, log=console.print)
        return
    from notice.training.card import write_model_card
    from notice.training.default_blip import Recipe
    from notice.training.default_blip import train_default as run

    summary = run(out, Recipe(seed=seed, threads=threads), log=console.print, eval_every_epoch=eval_each_epoch)
    write_model_card(out, summary, log=console.print)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


@app.command()
def pairs(task: str = typer.Argument(..., help="svo-probes, mit-states, facial-expressions, easyvqa-color or "
                                                "easyvqa-shape."),
          out: Path = typer.Option(..., "--out", "-o", help="Pairs file to write (Parquet); derived images and "
                                                            "masks go to <name>_files/ beside it."),
          data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder in its original layout "
                                                                   "(easy-VQA: the installed package by default)."),
          split: Optional[str] = typer.Option(None, help="easy-VQA: train or test (default test); "
                                                         "facial expressions: the images/ subfolder (default train)."),
          model: str = ModelOption,
          corruptions: str = typer.Option(",".join(DEFAULT_CORRUPTIONS), help="Comma-separated corruptions to make "
                                                                             "(text_str_both too)."),
          str_form: str = typer.Option("one", "--str-form", help="What text_str makes: one (the right option "
                                                                 "swapped) or both (both options swapped, the "
                                                                 "paper's form, as text_str_both)."),
          limit: Optional[int] = typer.Option(None, help="Use at most N source items (images, CSV rows or "
                                                         "image matches)."),
          seed: int = typer.Option(0, help="Seed of every random choice (partners, option order, STR, noise)."),
          skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count bad rows, images and folders "
                                                                  "instead of stopping.")) -> None:
    """Make clean/corrupt pairs of a task: SMP images, STR prompts and Gaussian-noise baselines."""
    from notice.models import load_tokenizer, prompt_budget
    from notice.tasks import TASKS, build_pairs

    with _boundary():
        check.check_all([("TASK", task, check.one_of(TASKS, "task")), ("--out", out, check.output_file),
                         ("--corruptions", corruptions, check.names(CORRUPTIONS, "corruption", comma_text=True)),
                         ("--str-form", str_form, check.one_of(tuple(STR_FORMS), "STR form")),
                         ("--limit", limit, check.whole(1, optional=True))]
                        + ([("--data", data, check.existing_folder)] if data is not None else []))
        tokenizer = load_tokenizer(model)  # STR and text-noise positions follow the model's own tokenizer
        budget = prompt_budget(model)  # a pair the model cannot read is bad input here, not a crash later
        with _progress() as progress:
            report = build_pairs(task, out, tokenizer, data=data, split=split, seed=seed,
                                 corruptions=corruptions.split(","), limit=limit, skip_bad=skip_bad,
                                 progress=progress, budget=budget, str_form=str_form)
    table = Table("corruption", "pairs", title=task)
    for kind, count in report.pairs.items():
        table.add_row(kind, str(count))
    console.print(table)
    console.print(f"wrote {sum(report.pairs.values())} pairs to {out}", highlight=False, soft_wrap=True)
    for reason, count in sorted(report.skipped.items()):
        console.print(f"skipped {count}: {reason}", highlight=False)
    for kind, count in sorted(report.str_rejected.items()):
        if count:
            console.print(f"{kind} rejected {count} contrast word draw(s) whose tokens did not align with the "
                          "clean prompt", highlight=False)


@app.command()
def select(pairs_file: Path = typer.Argument(..., metavar="PAIRS", help="Pairs file made by `notice pairs`."),
           out: Path = typer.Option(..., "--out", "-o", help="Selected pairs file to write (Parquet); drop counts "
                                                             "go to <name>.selection.json beside it."),
           model: str = ModelOption, device: str = DeviceOption, dtype: str = DtypeOption,
           threshold: float = typer.Option(0.0, help="Margin of the flip: clean logit difference above it, "
                                                     "corrupt below minus it."),
           seed: int = typer.Option(0, help="Seed of the balancing draw."),
           balance: bool = typer.Option(True, "--balance/--no-balance", help="Equal counts per category and "
                                                                             "answer order."),
           max_per_cell: Optional[int] = typer.Option(None, help="At most N pairs per category, answer order "
                                                                 "and corruption."),
           batch_size: int = typer.Option(32, help="Pairs per forward pass.")) -> None:
    """Keep pairs the model answers right whose corruption flips the answer; balance and report drops."""
    from notice.models import load_model
    from notice.pairs import pairs_provenance, read_pairs
    from notice.select import select_pairs, write_selection

    with _boundary():
        check.check_all([("--out", out, check.output_file), ("--device", device, check.device),
                         ("--dtype", dtype, check.dtype), ("--threshold", threshold, check.number(0)),
                         ("--max-per-cell", max_per_cell, check.whole(1, optional=True)),
                         ("--batch-size", batch_size, check.whole(1))])
        loaded = read_pairs(pairs_file)
        adapter = load_model(model, device=device, dtype=dtype)
        with _progress() as progress:
            selection = select_pairs(adapter, loaded, threshold=threshold, seed=seed, balance=balance,
                                     max_per_cell=max_per_cell, batch_size=batch_size, progress=progress)
        _print_selection(selection.as_dict(), out)
        written, report = write_selection(selection, out, pairs_provenance(pairs_file))
    console.print(f"wrote {written} and {report}", highlight=False, soft_wrap=True)


def _print_selection(summary: dict, out: Path) -> None:
    from notice.select import FILTERS

    table = Table("corruption", "input", *FILTERS, "kept", title="selection")
    for kind, row in summary["by_corruption"].items():
        table.add_row(kind, str(row["input"]), *(str(row[f]) for f in FILTERS), str(row["kept"]))
    console.print(table)
    for name in FILTERS:
        console.print(f"dropped {summary['dropped'][name]}: {name}", highlight=False, soft_wrap=True)
    console.print(f"kept {summary['kept']} of {summary['input']} pairs", highlight=False, soft_wrap=True)


@app.command()
def patch(pairs: Path = typer.Argument(..., help="Pairs file (Parquet, from `notice pairs` or `notice select`)."),
          model: str = ModelOption,
          sites: str = typer.Option("text.*.cross_attn.head*,text.*.mlp", "--sites",
                                    help="Comma-separated site patterns, e.g. 'text.*.cross_attn.head*,text.*.mlp'; "
                                         "positions: a number, *, all, last or answer (e.g. "
                                         "'lm.*.self_attn.head*@answer'); see `notice info` for a model's sites."),
          direction: str = typer.Option("denoise", help="denoise (clean into corrupt, as in the paper) or noise."),
          out: Path = typer.Option(..., "--out", help="Results folder (one Parquet shard per pair; reruns resume)."),
          max_memory: str = typer.Option("4GB", "--max-memory", help="Memory for the batched cells, e.g. 8GB."),
          batch_size: Optional[int] = typer.Option(None, help="Cells per forward (default: as many as fit)."),
          device: str = DeviceOption, dtype: str = DtypeOption,
          checks: bool = typer.Option(True, "--checks/--no-checks", help="Sanity checks on every pair."),
          limit: Optional[int] = typer.Option(None, help="Only the first N pairs."),
          workers: Optional[int] = typer.Option(None, "--workers", help="Spread the pairs over N Ray workers (one "
                                                                        "model each; needs notice[ray])."),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", help="A Ray cluster to join (host:port "
                                                                                 "or auto); default: a local one."),
          method: str = typer.Option("exact", "--method", help="exact (one rerun per cell), atp or atp* (every cell "
                                                               "estimated from gradients; see README)."),
          verify_top: Optional[int] = typer.Option(None, "--verify-top", help="With atp/atp*: also patch each pair's "
                                                                              "K highest-ranked cells exactly.")) -> None:
    """Activation patching of every site on every pair: a resumable long results table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from notice.models import load_model
    from notice.pairs import pairs_provenance, read_pairs
    from notice.patching.engine import count_cells, patch_pairs
    from notice.patching.attribution import METHODS
    from notice.patching.metrics import DIRECTIONS
    from notice.store import count_done, file_record

    records: list = []

    def interrupted() -> str:
        return (f"{count_done(out, [p.id for p in records])} of {len(records)} pairs done and kept in {out}; "
                "rerun the same command to resume")

    with _boundary(interrupted):
        patterns = check.check_all([
            ("--sites", sites, check.site_patterns), ("--direction", direction, check.one_of(DIRECTIONS, "direction")),
            ("--out", out, check.output_folder), ("--max-memory", max_memory, check.memory),
            ("--batch-size", batch_size, check.whole(1, optional=True)), ("--device", device, check.device),
            ("--dtype", dtype, check.dtype), ("--limit", limit, check.whole(1, optional=True)),
            ("--workers", workers, check.whole(1, optional=True)),
            ("--method", method, check.one_of(METHODS, "method")),
            ("--verify-top", verify_top, check.whole(1, optional=True))])[0]
        if verify_top is not None and method == "exact":
            raise NoticeError(f"--verify-top {verify_top} verifies estimates: use it with --method atp or atp*")
        if method != "exact" and any(p.strip().endswith("@all") for p in patterns):
            raise NoticeError(f"--method {method}: @all patches every position at once, which is no single node to "
                              "attribute; give positions (a number, *, last or answer) or use --method exact")
        if ray_address is not None and workers is None:
            raise NoticeError(f"--ray-address {ray_address} needs --workers N: say how many workers to start")
        records = read_pairs(pairs)[:limit]
        provenance = {"seed": pairs_provenance(pairs).get("seed"), "pairs": [file_record(pairs)]}
        columns = (TextColumn("[bold]patching"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                   TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True,  # an error or Ctrl-C: one line, no bar
                      disable=not err_console.is_terminal) as bar:
            task = bar.add_task("patch", total=None, rate="")
            clock = {"start": time.perf_counter(), "cells": 0, "pairs": 0}

            def advance(n: int, skipped: bool = False) -> None:
                if skipped:  # finished earlier: counts toward the bar, not toward the speed
                    clock["start"] = time.perf_counter()
                    clock["cells"] = clock["pairs"] = 0
                else:
                    clock["cells"] += n
                elapsed = time.perf_counter() - clock["start"]
                rate = f"{clock['cells'] / elapsed:.1f} cells/s" if elapsed > 0 else ""
                if workers is not None and elapsed > 0:  # the Ray path reports whole pairs
                    rate += f", {clock['pairs'] / elapsed:.2f} pairs/s"
                bar.update(task, advance=n, rate=rate)

            if workers is None:
                adapter = load_model(model, device=device, dtype=dtype)
                bar.update(task, total=sum(count_cells(adapter, records, patterns)))
                summary = patch_pairs(adapter, records, patterns, out, direction, max_memory=max_memory,
                                      batch_size=batch_size, checks=checks, progress=advance, model_name=model,
                                      dtype=dtype, provenance=provenance, method=method, verify_top=verify_top)
            else:
                from notice.executors.ray import patch_pairs_on_ray
                from notice.models import resolve_model

                resolve_model(model)  # an unknown name is one line here, not in every worker

                def pair_done() -> None:
                    clock["pairs"] += 1

                summary = patch_pairs_on_ray(model, records, patterns, out, direction, workers=workers,
                                             address=ray_address, device=device, dtype=dtype, max_memory=max_memory,
                                             batch_size=batch_size, checks=checks, provenance=provenance,
                                             on_total=lambda cells: bar.update(task, total=cells),
                                             progress=advance, on_pair=pair_done, method=method,
                                             verify_top=verify_top)
    console.print(f"{summary['done']} pairs patched, {summary['skipped']} already done, {summary['cells']} cells "
                  f"in all; results in {out}")
    if summary.get("failed"):  # not bad input: workers died on these pairs every time they were tried
        err_console.print(f"[bold red]error:[/] {len(summary['failed'])} pair(s) lost their worker on every try "
                          f"({', '.join(summary['failed'])}); rerun the same command to try them again",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@app.command()
def compare(estimated: Path = typer.Argument(..., help="Results folder of `notice patch --method atp|atp*`."),
            exact: Optional[Path] = typer.Argument(None, help="Results folder of an exact sweep of the same pairs and "
                                                              "sites (default: the verified rows of ESTIMATED)."),
            k: int = typer.Option(20, "--k", help="The exact top-k cells that should be found..."),
            k_prime: int = typer.Option(100, "--k-prime", help="...inside the estimate's top-k'."),
            out: Optional[Path] = typer.Option(None, "--out", help="Also write the per-pair agreement here (CSV).")) -> None:
    """How an attribution-patching ranking agrees with exact patching: Spearman, recall of the exact top-k
    within the estimated top-k', and the largest misses."""
    from notice.patching.attribution import compare_tables
    from notice.store import load_results

    with _boundary():
        check.check_all([("ESTIMATED", estimated, check.existing_folder), ("--k", k, check.whole(1)),
                         ("--k-prime", k_prime, check.whole(1))]
                        + ([("EXACT", exact, check.existing_folder)] if exact is not None else [])
                        + ([("--out", out, check.output_file)] if out is not None else []))
        table = load_results(estimated)
        approx = table[table["method"].isin(["atp", "atp*"])]
        reference = load_results(exact) if exact is not None else table
        reference = reference[reference["method"] == "exact"]
        if approx.empty or reference.empty:
            raise NoticeError(f"{estimated}: no {'estimated' if approx.empty else 'exact'} rows to compare; give the "
                              "results of --method atp or atp* and an exact sweep of the same pairs")
        result = compare_tables(approx, reference, k, k_prime)
    console.print(f"{result['pairs']} pairs: Spearman (median) {result['spearman_median']:.3f}; exact top-{k} inside "
                  f"the estimated top-{k_prime}: {100 * result[f'recall@{k}in{k_prime}_mean']:.1f}% of cells, in every "
                  f"pair {100 * result['pairs_with_all_inside']:.0f}% of the time", highlight=False)
    if not result["largest_misses"].empty:
        table_view = Table("pair", "site", "exact |effect|", "rank in estimate", title="largest misses")
        for row in result["largest_misses"].itertuples():
            table_view.add_row(str(row.pair_id), str(row.site), f"{row.exact_effect:.3f}", str(row.estimate_rank))
        console.print(table_view)
    if out is not None:
        from notice.io import atomic_path

        with atomic_path(out) as tmp:
            result["per_pair"].to_csv(tmp, index=False)
        console.print(f"wrote {out}", highlight=False)


@app.command()
def run(config: Path = typer.Argument(..., help="Run config (YAML): model, tasks, selection, sites, report."),
        out: Optional[Path] = typer.Option(None, help="Run folder (overrides the config's out).")) -> None:
    """The whole pipeline for any model, tasks and sites named in a config file; resumable."""
    from notice.pipeline import load_config, run_pipeline

    settings = None
    with _boundary(lambda: _kept(settings.out) if settings else "nothing was written"):
        if out is not None:
            check.output_folder("--out", out)
        settings = load_config(config, out)
        page = run_pipeline(settings, console)
    console.print(f"report: {page}")


@app.command("head-functions")
def head_functions(pairs: Path = typer.Argument(..., help="Selected pairs file (Parquet): their clean inputs are measured."),
                   out: Path = typer.Option(..., "--out", help="Folder of the head-function tables."),
                   model: str = ModelOption, device: str = DeviceOption, dtype: str = DtypeOption,
                   limit: Optional[int] = typer.Option(None, help="Only the first N pairs.")) -> None:
    """What heads do: each head's attention to the image against the object masks, as tables for the report."""
    from notice.analysis.head_functions import write_head_functions
    from notice.models import load_model
    from notice.pairs import read_pairs

    with _boundary():
        check.check_all([("PAIRS", pairs, check.existing_file), ("--out", out, check.output_folder),
                         ("--device", device, check.device), ("--dtype", dtype, check.dtype),
                         ("--limit", limit, check.whole(1, optional=True))])
        records = read_pairs(pairs)[:limit]
        adapter = load_model(model, device=device, dtype=dtype)
        check.prompts_fit(adapter, [p.clean_prompt for p in records], "drop those pairs")
        folder = write_head_functions(adapter, records, out)
    console.print(f"head functions of {len(records)} clean inputs in {folder}", highlight=False, soft_wrap=True)


@app.command()
def report(results: Path = typer.Argument(..., help="A run folder of `notice run`/`demo`, or a `notice patch` output."),
           out: Path = typer.Option(..., help="Folder of the HTML report."),
           pairs: Optional[list[Path]] = typer.Option(None, help="Selected pairs files (images for the overlays)."),
           head_functions: Optional[Path] = typer.Option(None, "--head-functions",
                                                         help="Folder written by `notice head-functions`."),
           title: str = typer.Option("notice report", help="Report title."),
           min_conditions: Optional[int] = typer.Option(None, help="Universal: important in at least k conditions."),
           top_k: int = typer.Option(10, help="Heads listed per condition."),
           rule: Optional[list[str]] = typer.Option(None, "--rule", help="Head-selection rule: default, notice (the "
                                                                         "paper's) or notice-code (the research "
                                                                         "code's position); several side by side, "
                                                                         "e.g. --rule default,notice.")) -> None:
    """Heatmaps, ranked and universal heads, head functions: a static HTML report (reads tables only)."""
    from notice.report.build import report_from_folder

    with _boundary():
        check.check_all([("RESULTS", results, check.existing_folder), ("--out", out, check.output_folder),
                         ("--min-conditions", min_conditions, check.whole(1, optional=True)),
                         ("--top-k", top_k, check.whole(1)), ("--rule", rule or ["default"], check.head_rules)]
                        + [("--pairs", path, check.existing_file) for path in pairs or []]
                        + ([("--head-functions", head_functions, check.existing_folder)] if head_functions else []))
        page = report_from_folder(results, out, pairs_files=pairs or [], head_functions=head_functions, title=title,
                                  min_conditions=min_conditions, top_k=top_k, rules=rule or ["default"])
    console.print(f"report: {page}")


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Run folder."),
         processes: Optional[int] = typer.Option(None, help="Models run side by side in this many processes "
                                                            "(default: one per model on a multi-core machine).")) -> None:
    """The main job on the embedded models: pairs, selection, exact patching, analysis, one report."""
    from notice.pipeline import run_demo

    with _boundary(lambda: _kept(out)):
        check.check_all([("--out", out, check.output_folder)]
                        + ([("--processes", processes, check.whole(1))] if processes is not None else []))
        page = run_demo(out, console, processes)
    console.print(f"report: {page.resolve()}")


def _kept(folder: Path) -> str:
    """What an interrupted run keeps: its finished steps and every patched pair."""
    shards = len(list(folder.glob("**/shards/*.parquet"))) if folder.is_dir() else 0
    return (f"finished steps and {shards} patched pair(s) are kept in {folder}; rerun the same command to resume"
            if folder.is_dir() else "nothing was written")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
