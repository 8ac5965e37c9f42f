"""`ragq collections`, `ragq docs` and `ragq forget`: what is stored, by collection, and removing documents."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ragq.cli_common import EXIT_FAILED_INPUT, JSON_HELP, _error_line, _guard, _print_json, _settings, _setup_logging, out


def _client() -> Any:
    from ragq.client import Client

    _setup_logging()
    return Client(_settings())


@_guard
def collections(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """The collections, with their documents and chunks."""
    rows = _client().collections()
    if as_json:
        _print_json(rows)
        return
    table = Table("collection", "documents", "chunks", "last ingested", title="collections", title_justify="left")
    for r in rows:
        table.add_row(r["collection"], str(r["documents"]), str(r["chunks"]), str(r["last_ingested"])[:19])
    out.print(table)


@_guard
def docs(
    collection: Annotated[str | None, typer.Option(help="one collection (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """The documents stored: key, version (content hash), chunks, when ingested, by which job."""
    rows = _client().documents(collection)
    if as_json:
        _print_json(rows)
        return
    table = Table("collection", "key", "version", "chunks", "ingested", "job", title="documents", title_justify="left")
    for r in rows:
        table.add_row(r["collection"], r["key"], r["version"][:12], str(r["chunks"]), str(r["ingested_at"])[:19],
                      (r["job_id"] or "-")[:8])
    out.print(table)


@_guard
def forget(
    keys: Annotated[list[str] | None, typer.Argument(help="document keys (as `ragq docs` shows them)")] = None,
    collection: Annotated[str | None, typer.Option(help="the collection (default: default)")] = None,
    everything: Annotated[bool, typer.Option("--all", help="every document of the collection")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Remove documents, their chunks and vectors. Exit 1 if a key is unknown (the others are still removed)."""
    result = _client().forget(keys or [], collection=collection, everything=everything)
    for key in result["missing"]:
        _error_line(f"{key}: no such document in collection {result['collection']!r} (see `ragq docs`)")
    if as_json:
        _print_json(result)
    else:
        chunks = sum(r["chunks_removed"] for r in result["removed"])
        out.print(f"forgot {len(result['removed'])} document(s) of {result['collection']!r}, {chunks} chunks",
                  highlight=False)
    if result["missing"]:
        raise typer.Exit(EXIT_FAILED_INPUT)
