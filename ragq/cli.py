"""The `ragq` command line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ragq.core.errors import BadInput
from ragq.replies import print_reply
from ragq.terminal import keys, wait_with_progress

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="ragq", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, context_settings=HELP,
    help="A RAG stack (embed, search, rerank, generate) as Celery jobs on GPUs too small for every model at once.",
)
services_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                           help="Embedded Redis and Postgres+pgvector under RAGQ_HOME.")
app.add_typer(services_app, name="services")
COLLECTION_HELP = "the collection to put them in (default: default); `ragq collections` lists them"
from ragq.cli_common import (  # noqa: E402
    EXIT_FAILED_INPUT, JSON_HELP, _error_line, _guard, _print_json, _settings,
    _setup_logging, err, out,
)


def _version(show: bool) -> None:
    if show:
        from ragq import __version__

        out.print(f"ragq {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print ragq's version and exit")] = False) -> None:
    """A RAG stack (embed, search, rerank, generate) as Celery jobs on GPUs too small for every model at once."""

# -- services ------------------------------------------------------------------------------------------------------
@services_app.command("up")
@_guard
def services_up(as_json: Annotated[bool, typer.Option("--json", help="print the endpoints as JSON")] = False) -> None:
    """Start the embedded Redis and Postgres (only those with no URL configured); reuse them if running."""
    from ragq.core.services import EmbeddedServices

    _setup_logging()
    settings = _settings()
    services = EmbeddedServices(settings)
    services.up()
    _show_status(services.status(), as_json)


@services_app.command("status")
@_guard
def services_status(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Show the endpoints and whether the embedded servers run."""
    from ragq.core.services import EmbeddedServices

    _setup_logging()
    _show_status(EmbeddedServices(_settings()).status(), as_json)


@services_app.command("down")
@_guard
def services_down(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Stop the embedded servers that ragq started (by their recorded pids); external services are untouched."""
    from ragq.core.services import EmbeddedServices

    _setup_logging()
    stopped = EmbeddedServices(_settings()).down()
    if as_json:
        _print_json({"stopped": stopped})
    else:
        for name, pid in stopped.items():
            out.print(f"{name.split('_')[0]}: {'stopped pid ' + str(pid) if pid else 'was not running'}")


def _show_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(status)
        return
    from ragq.core.services import redact

    table = Table(show_header=False, box=None)
    for key in ("home", "redis", "postgres", "broker_url", "result_backend", "database_url", "redis_pid",
                "postgres_pid"):
        table.add_row(key, redact(str(status.get(key) or "-")))   # --json prints the URLs whole, for scripts
    out.print(table)


# -- schema and worker ----------------------------------------------------------------------------------------------
@app.command()
@_guard
def migrate() -> None:
    """Apply the database migrations (also applied automatically on first use)."""
    from ragq.core.db import migrate as run_migrations
    from ragq.core.services import ensure_services

    _setup_logging()
    revision = run_migrations(ensure_services(_settings()).database_url)
    out.print(f"database at revision {revision}")


@app.command()
@_guard
def worker(
    device: Annotated[str, typer.Option(help="cpu, cuda:N, or all (one process per visible GPU)")] = "cpu",
    concurrency: Annotated[int | None, typer.Option(help="task threads (default RAGQ_WORKER_CONCURRENCY)")] = None,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    name: Annotated[str | None, typer.Option(help="worker name before @host (default from the device)")] = None,
    queues: Annotated[str | None, typer.Option(hidden=True)] = None,
    attach: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Run a GPU (or CPU) worker: the device's engine process and Celery consumers of the urgent and background
    queues (the urgent one a process of its own, so questions never wait for a thread held by ingestion)."""
    from workers.devices import parse_device
    from workers.start import run_worker

    _setup_logging(loglevel.upper())
    raise typer.Exit(run_worker(_settings(), parse_device(device), concurrency, loglevel.upper(), name, queues,
                                attach))


@app.command()
@_guard
def flower(
    read_only: Annotated[bool, typer.Option(help="views and read API only: endpoints that act on workers or "
                                                 "tasks answer 403")] = False,
) -> None:
    """Flower on ragq's broker, always with authentication: basic auth from RAGQ_FLOWER_USER and
    RAGQ_FLOWER_PASSWORD, or OAuth from RAGQ_FLOWER_AUTH (a regex of the e-mail addresses let in) with Flower's
    FLOWER_AUTH_PROVIDER and FLOWER_OAUTH2_KEY / _SECRET / _REDIRECT_URI. Listens on RAGQ_FLOWER_ADDRESS
    (127.0.0.1) and RAGQ_FLOWER_PORT (5555)."""
    from ragq import flower as flower_module

    _setup_logging("INFO")
    settings = _settings()
    flower_module.auth_arguments(settings)   # refuse before starting anything
    flower_module.run(settings, read_only=read_only)


# -- ingestion ----------------------------------------------------------------------------------------------------
@app.command()
@_guard
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="DoclingDocument .json, .md, .txt files or folders of them")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with a progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait")] = None,
    collection: Annotated[str | None, typer.Option(help=COLLECTION_HELP)] = None,
    sync: Annotated[bool, typer.Option("--sync", help="the inputs are the collection's whole truth: once they are "
                                       "in, its documents they do not name are forgotten")] = False,
) -> None:
    """Queue documents for background ingestion. A file ingested again with changed content replaces its old
    version (its unchanged chunks keep their vectors). Exit 1 if any input failed (the others are still ingested)."""
    from ragq.client import Client

    _setup_logging()
    client = Client(_settings())
    submission = client.submit_ingest(paths, collection=collection, sync=sync)
    result: dict[str, Any] = {**submission.as_dict(), "chunks": None, "chunks_added": None, "status": "queued"}
    # the same count fields as `ragq job --json`
    result.update(documents_total=submission.documents + len(submission.failed), documents_done=0,
                  documents_failed=len(submission.failed), chunks_total=0)
    still = None
    for failure in submission.failed:
        _error_line(f"{failure.path}: {failure.error}")
    if submission.skipped:
        _error_line(f"skipped {len(submission.skipped)} file(s) of other types in the folders given (first: "
                    f"{submission.skipped[0]}): ragq takes DoclingDocument .json, .md and .txt")
    if wait and submission.documents:
        status = wait_with_progress(client, submission.job_id, timeout, not as_json, err)
        already = {f.path for f in submission.failed}
        for failure in status["failed"]:
            if failure["path"] not in already:
                _error_line(f"{failure['path']}: {failure['error']}")
        result.update(
            status=status["status"], chunks=status["chunks_total"], chunks_added=status["chunks_added"],
            chunks_reused=status["chunks_reused"],
            documents=status["documents_done"], failed=status["failed"],
            **{k: status[k] for k in ("documents_total", "documents_done", "documents_failed", "chunks_total")},
        )
        still = status.get("still_running")
    elif not submission.documents:
        result["status"] = "failed" if submission.failed else "completed"
    if as_json:
        _print_json(result)
    elif wait:
        out.print(f"job {result['job_id']}: {result['status']} — {result['documents']} documents, "
                  f"{result['chunks']} chunks ({result['chunks_added']} new, {result['chunks_reused']} reused), "
                  f"{len(result['failed'])} failed")
    else:
        out.print(f"job {result['job_id']}: queued {submission.documents} documents, "
                  f"{len(submission.failed)} rejected; follow it with `ragq job {result['job_id']}`")
    if still:
        _error_line(still)
    if result["failed"] or still:
        raise typer.Exit(EXIT_FAILED_INPUT)


@app.command()
@_guard
def job(job_id: str, as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Show a job's status and failed inputs: an ingestion, or background questions with their answers."""
    from ragq.client import Client

    _setup_logging()
    status = Client(_settings()).job_status(job_id)
    if as_json:
        _print_json(status)
        if status["status"] in ("failed", "completed_with_errors"):
            raise typer.Exit(EXIT_FAILED_INPUT)
        return
    if status["kind"] == "questions":
        out.print(f"job {job_id}: {status['status']} — {status['questions_done']}/{status['questions_total']} "
                  f"questions answered, {status['questions_failed']} failed", soft_wrap=True)
        for answer in status["answers"]:
            out.print(f"  {answer['n']}. Q: {answer['question']}", highlight=False, markup=False, soft_wrap=True)
            out.print(f"     A: {answer['answer']}", highlight=False, markup=False, soft_wrap=True)
        for failure in status["failed"]:
            out.print(f"  failed: {failure['path'] or 'question ' + str(failure['n'])}: {failure['error']}",
                      highlight=False, markup=False, soft_wrap=True)
        if status["status"] in ("failed", "completed_with_errors"):
            raise typer.Exit(EXIT_FAILED_INPUT)
        return
    out.print(f"job {job_id}: {status['status']} — {status['documents_done']}/{status['documents_total']} documents, "
              f"{status['chunks_total']} chunks ({status['chunks_added']} new), {status['documents_failed']} failed")
    for failure in status["failed"]:
        out.print(f"  failed: {failure['path']}: {failure['error']}", highlight=False, markup=False, soft_wrap=True)
    if status["status"] in ("failed", "completed_with_errors"):
        raise typer.Exit(EXIT_FAILED_INPUT)


# -- operations ---------------------------------------------------------------------------------------------------
@app.command()
@_guard
def beat(loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO") -> None:
    """Run Celery beat: sends the periodic jobs (alert evaluation every RAGQ_ALERT_INTERVAL_S) to the workers."""
    from ragq.core.services import ensure_services
    from workers.celery_app import app as celery_app
    from workers.celery_app import configure_app

    _setup_logging(loglevel.upper())
    settings = _settings()
    configure_app(settings, ensure_services(settings))
    schedule = settings.home / "beat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app.Beat(loglevel=loglevel.upper(), schedule=str(schedule)).run()


@app.command()
@_guard
def alerts(
    since: Annotated[str, typer.Option(help="also list alerts started within this long: 30m, 6h, 2d")] = "24h",
    evaluate: Annotated[bool, typer.Option("--evaluate", help="evaluate the rules once, now, first")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List open alerts and those started recently (pending, firing, resolved)."""
    from datetime import datetime, timezone

    from workers import alerts as alert_rules
    from ragq.core.db import ensure_schema, get_engine
    from ragq.core.services import ensure_services

    _setup_logging()
    settings = _settings()
    url = ensure_services(settings).database_url
    ensure_schema(url)
    db = get_engine(url)
    if evaluate:
        alert_rules.evaluate(db, window_s=settings.alert_window_s, queue_for_s=settings.alert_queue_for_s)
    rows = alert_rules.recent(db, datetime.now(timezone.utc) - parse_duration(since))
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print(f"no alerts open or started in the last {since}")
        return
    table = Table("state", "severity", "rule", "subject", "since", "message")
    for row in rows:
        style = {"firing": "bold red", "pending": "yellow"}.get(row["state"], "")
        table.add_row(row["state"], row["severity"], row["rule"], row["subject"],
                      row["started_at"].strftime("%Y-%m-%d %H:%M:%S"), row["message"], style=style)
    out.print(table)


@app.command()
@_guard
def report(
    since: Annotated[str, typer.Option(help="the window: the last 90s, 30m, 6h, 2d")] = "1h",
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    html_file: Annotated[Path | None, typer.Option("--html", help="also write an HTML report with plots")] = None,
) -> None:
    """Timings report from stage_timings, model_events, device_samples and alerts: p50/p90/p99 per model and
    stage, queue vs compute, throughput, batch sizes, loads and their durations, alerts."""
    from datetime import datetime, timezone

    from ragq import report as reports
    from ragq.core.db import ensure_schema, get_engine
    from ragq.core.services import ensure_services

    _setup_logging()
    window = parse_duration(since)
    url = ensure_services(_settings()).database_url
    ensure_schema(url)
    db = get_engine(url)
    until = datetime.now(timezone.utc)
    data = reports.build(db, until - window, until)
    if html_file is not None:
        page = reports.render_html(data, reports.series(db, until - window, until))
        partial = html_file.with_name(html_file.name + ".partial")
        try:  # whole or not at all: a failed write leaves no truncated report behind
            partial.write_text(page)
            partial.replace(html_file)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BadInput(str(html_file), f"cannot write the HTML report: {exc.strerror or exc}") from None
    if as_json:
        _print_json(reports.to_json(data))
        return
    reports.render_text(data, out)
    if html_file is not None:
        out.print(f"HTML report: {html_file}")


@app.command()
@_guard
def top(
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --once: the frame as JSON")] = False,
) -> None:
    """Live view: queue depths, each worker's device memory and resident models, recent latencies, open alerts."""

    from rich.live import Live

    from ragq.core.db import ensure_schema, get_engine
    from ragq.core.services import ensure_services
    from ragq.top import render, snapshot

    _setup_logging()
    if interval <= 0:
        raise typer.BadParameter(f"--interval {interval} must be above 0")
    if as_json and not once:
        raise typer.BadParameter("--json prints one frame: add --once", param_hint="--json")
    endpoints = ensure_services(_settings())
    ensure_schema(endpoints.database_url)
    db = get_engine(endpoints.database_url)
    if once:
        frame = snapshot(db, endpoints.broker_url)
        if as_json:
            _print_json(frame)
        else:
            out.print(render(frame))
        return
    with Live(render(snapshot(db, endpoints.broker_url)), console=out, refresh_per_second=4, screen=False) as live, \
            keys() as pressed:
        try:
            while pressed(interval) != "q":
                live.update(render(snapshot(db, endpoints.broker_url)))
        except KeyboardInterrupt:
            pass


@app.command()
@_guard
def tune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the symptoms and moves; change nothing")] = False,
    history: Annotated[int, typer.Option(min=0, help="also list this many recent tuning actions")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Run one step of the tuning playbook now (ragq beat runs it every RAGQ_TUNE_INTERVAL_S): the symptoms in
    the last RAGQ_TUNE_WINDOW_S, the knob moves they call for, the live knob values and recent actions."""
    from dataclasses import asdict

    from sqlalchemy import text

    from workers import tuning
    from ragq.core.db import ensure_schema, get_engine
    from ragq.core.services import ensure_services
    from workers.models import load_model_specs

    _setup_logging()
    settings = _settings()
    url = ensure_services(settings).database_url
    ensure_schema(url)
    db = get_engine(url)
    specs = load_model_specs(settings.models)
    symptoms, moves = tuning.tick(db, settings, specs, dry_run=dry_run)
    with db.connect() as conn:
        knobs = tuning.current_knobs(conn, tuning.knob_defaults(settings, specs))
        actions = [dict(r) for r in conn.execute(text(
            "SELECT ts, knob, before, after, symptom, evidence FROM tuning_actions ORDER BY id DESC LIMIT :n"),
            {"n": history}).mappings()]
    if as_json:
        _print_json({"dry_run": dry_run, "symptoms": [asdict(s) for s in symptoms],
                     "moves": [asdict(m) for m in moves],
                     "knobs": {k.name: {"value": k.value, "low": k.low, "high": k.high, "pinned": k.pinned}
                               for k in knobs.values()},
                     "actions": actions})
        return
    out.print(f"symptoms: {', '.join(f'{s.name} {s.subject}'.strip() for s in symptoms) or 'none'}")
    for move in moves:
        out.print(f"{'would move' if dry_run else 'moved'} {move.knob}: {move.before:g} -> {move.after:g} "
                  f"({move.symptom}: {move.evidence})", highlight=False)
    table = Table("knob", "value", "bounds", "pinned")
    for knob in knobs.values():
        table.add_row(knob.name, f"{knob.value:g}", f"{knob.low:g}..{knob.high:g}", "yes" if knob.pinned else "")
    out.print(table)
    for action in actions:
        out.print(f"{action['ts']:%Y-%m-%d %H:%M:%S} {action['knob']}: {action['before']:g} -> {action['after']:g} "
                  f"({action['symptom']})", highlight=False)


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `6h`, `2d` -> a timedelta; anything else is a usage error naming the value."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        number, unit = float(text[:-1]), units[text[-1]]
        if number < 0:
            raise ValueError
    except (ValueError, KeyError, IndexError):
        raise typer.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 6h or 2d") from None
    return timedelta(seconds=number * unit)


# -- questions ----------------------------------------------------------------------------------------------------
@app.command()
@_guard
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the answer")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="passages to return")] = None,
    collection: Annotated[str | None, typer.Option(help="the collection to search (default: default)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer, sources and timings as JSON")] = False,
) -> None:
    """Ask a question over the urgent queue (synchronous RPC); the answer is printed as it is generated, then
    its sources and timings (--json: one object at the end)."""
    from ragq.client import Client

    _setup_logging()
    client = Client(_settings())
    if as_json:
        _print_json(client.ask(question, timeout_s=timeout, top_k=top_k, collection=collection))
        return
    reply: dict[str, Any] = {}
    shown = False
    for part in client.ask_stream(question, timeout_s=timeout, top_k=top_k, collection=collection):
        if isinstance(part, dict):
            reply = part
            break
        if not shown:
            out.print(f"[bold]Q:[/] {question.strip()}", highlight=False)
            out.print("[bold]A:[/] ", end="", highlight=False)
            shown = True
        out.print(part, end="", highlight=False, markup=False, soft_wrap=True)
        out.file.flush()
    print_reply(reply, out, answered=shown)


@app.command()
@_guard
def questions(
    file: Annotated[Path, typer.Argument(help="a text file of questions, one per line; - for standard input")],
    wait: Annotated[bool, typer.Option("--wait", help="wait for the answers, with a progress bar")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary (with the answers when --wait)")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="passages per answer")] = None,
    collection: Annotated[str | None, typer.Option(help="the collection to search (default: default)")] = None,
    batch: Annotated[int | None, typer.Option(help="questions per task (default RAGQ_QUESTION_BATCH)")] = None,
) -> None:
    """Queue questions as background work, behind urgent questions; answers are kept (`ragq job ID`). Exit 1 if
    any question failed (the others are still answered)."""
    from ragq.client import Client, questions_from_file

    _setup_logging()
    texts, labels = questions_from_file(file)
    client = Client(_settings())
    submission = client.submit_questions(texts, top_k=top_k, batch=batch, labels=labels, collection=collection)
    for failure in submission.failed:
        _error_line(f"{failure.path}: {failure.error}")
    result: dict[str, Any] = {**submission.as_dict(), "status": "queued"}
    still = None
    if wait and submission.questions:
        status = wait_with_progress(client, submission.job_id, timeout, not as_json, err)
        already = {f.path for f in submission.failed}
        for failure in status["failed"]:
            if failure["path"] not in already:   # failed in the worker
                _error_line(f"{failure['path']}: {failure['error']}")
        result.update(status=status["status"], answers=status["answers"],
                      failed=[{"path": f["path"], "error": f["error"]} for f in status["failed"]])
        still = status.get("still_running")
    elif not submission.questions:
        result["status"] = "failed"
    if as_json:
        _print_json(result)
    elif wait:
        for answer in result.get("answers", []):
            out.print(f"[bold]{answer['n']}. Q:[/] {escape(answer['question'])}", highlight=False)
            out.print(f"   A: {answer['answer']}", highlight=False, markup=False)
        out.print(f"job {result['job_id']}: {result['status']} — {len(result.get('answers', []))} answered, "
                  f"{len(result['failed'])} failed")
    else:
        out.print(f"job {result['job_id']}: queued {submission.questions} questions, {len(submission.failed)} "
                  f"rejected; follow it with `ragq job {result['job_id']}`")
    if still:
        _error_line(still)
    if result["failed"] or still:
        raise typer.Exit(EXIT_FAILED_INPUT)


@app.command()
@_guard
def demo(
    keep_services: Annotated[bool, typer.Option(help="leave the services running afterwards")] = False,
) -> None:
    """Start services and a worker, ingest the sample corpus, ask three questions, then stop what it started."""
    from ragq.demo import run_demo

    _setup_logging()
    raise typer.Exit(run_demo(_settings(), out, keep_services=keep_services))


from ragq.cli_catalog import collections, docs, forget  # noqa: E402 - they use the helpers above

from ragq.cli_eval import eval_  # noqa: E402

for command in (collections, docs, forget):
    app.command()(command)
app.command("eval")(eval_)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
