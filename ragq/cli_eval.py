"""`ragq eval`: retrieval quality on a BEIR-format folder, through the real stack (ragq.evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ragq.cli_common import EXIT_USAGE, JSON_HELP, _fail, _guard, _print_json, _settings, _setup_logging, err, out


@_guard
def eval_(
    dataset: Annotated[Path, typer.Argument(help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")],
    collection: Annotated[str | None, typer.Option(help="the collection its passages go to (default eval-NAME)")
                          ] = None,
    top_k: Annotated[int, typer.Option(help="the cut-off of nDCG, Recall and MRR")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP + " (with per-query results)")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="also write an HTML report here")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the ingestion and for each query")] = 600.0,
) -> None:
    """Ingest a BEIR dataset's passages (reused if already there), ask its queries through the urgent path, and
    compare nDCG@k, Recall@k/100 and MRR@k with exact search over the same chunks and with BM25; latency too."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ragq.client import Client
    from ragq.evaluation import evaluate, render_html

    if html is not None and not html.parent.is_dir():
        _fail(f"--html {html}: cannot write the HTML report: {html.parent} is not a folder", EXIT_USAGE)
    _setup_logging()
    client = Client(_settings())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        result = evaluate(client, dataset, collection=collection, top_k=top_k, timeout_s=timeout, progress=step)
    if html is not None:
        html.write_text(render_html(result), encoding="utf-8")
    if as_json:
        _print_json(result)
        return
    names = list(result["measures"]["ragq"])
    table = Table("system", *names, title=f"{result['collection']}: {result['passages']} passages, "
                  f"{result['queries']} queries", title_justify="left")
    for system, values in result["measures"].items():
        table.add_row(system, *(f"{values[n]:.4f}" for n in names))
    ratio = result["ragq_over_exact"]
    table.add_row("ragq / exact", *("-" if ratio[n] is None else f"{ratio[n]:.3f}" for n in names))
    out.print(table)
    latency, ingest = result["latency_ms"], result["ingest"]
    out.print(f"query latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms, p99 {latency['p99']:.0f} ms "
              f"({result['depth']} passages deep); ingestion {ingest['seconds']:.1f} s, {ingest['chunks']} chunks "
              f"({ingest['chunks_added']} new)")
    if html is not None:
        out.print(f"HTML report: {html}")
