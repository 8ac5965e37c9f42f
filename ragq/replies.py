"""How a reply to a question is shown in a terminal: the answer, its sources and a per-stage timing table (the CLI's
`ragq ask` and the demo share it)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_reply(reply: dict[str, Any], console: Console, answered: bool = False) -> None:
    """The question, its answer (unless `answered`: it was streamed already), sources and timings."""
    if answered:
        console.print()   # ends the streamed answer's line
    else:
        console.print(f"[bold]Q:[/] {reply['question']}", highlight=False)
        console.print(f"[bold]A:[/] {reply['answer']}", highlight=False)
    if reply.get("note"):
        console.print(f"[dim]({reply['note']})[/]", highlight=False)
    sources = Table(title="sources", show_lines=False, title_justify="left")
    for column in ("#", "document", "score", "passage"):
        sources.add_column(column, overflow="fold")
    for i, s in enumerate(reply["sources"], 1):
        snippet = s["text"].replace("\n", " ")
        sources.add_row(str(i), s["document"], f"{s['score']:.3f}", snippet[:110] + ("…" if len(snippet) > 110 else ""))
    console.print(sources)
    console.print(timing_table(reply))


def timing_table(reply: dict[str, Any]) -> Table:
    first = reply.get("first_token_ms")
    title = f"timings (total {reply.get('total_ms') or 0:.0f} ms" + (f", first token {first:.0f} ms)" if first else ")")
    table = Table(title=title, title_justify="left")
    for column in ("stage", "model", "queue ms", "load ms", "compute ms", "batch"):
        table.add_column(column, justify="right" if "ms" in column or column == "batch" else "left")
    for stage, t in reply["timings"].items():
        table.add_row(stage, str(t.get("model") or "-"), f"{t['queue_ms']:.1f}", f"{t['load_ms']:.1f}",
                      f"{t['compute_ms']:.1f}", str(t.get("batch_size") or "-"))
    return table
