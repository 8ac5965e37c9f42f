"""`ragq eval`: retrieval quality on a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/test.tsv), through
the real stack, beside exact search over the same chunks and BM25.

The passages are ingested into a collection of their own (reused when already there: unchanged passages are not
embedded again), each as one document whose key names its passage. Every query is asked through the urgent path
(`Client.ask` with `retrieve_only`: the ranking after search and rerank, no answer generated), 100 passages deep; the
search stage also returns what exact search finds with the same query vector. BM25 (rank-bm25) ranks the same chunk
texts. nDCG@10, Recall@10, Recall@100 and MRR@10 come from ir-measures (pytrec_eval's implementations).
"""

from __future__ import annotations

import html
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragq.core.errors import BadInput

DEPTH = 100   # passages per query in every run: Recall@100 needs them


@dataclass
class Dataset:
    name: str
    corpus: dict[str, str]            # passage id -> text (title and body)
    queries: dict[str, str]           # query id -> text, only those with judgements
    qrels: dict[str, dict[str, int]]  # query id -> passage id -> relevance


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BadInput(str(path), "missing: a BEIR folder has corpus.jsonl, queries.jsonl and qrels/test.tsv")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}:{number}", f"not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
            raise BadInput(f"{path}:{number}", 'each line needs "_id" and a "text" string')
        rows.append(row)
    if not rows:
        raise BadInput(str(path), "has no rows")
    return rows


def load_dataset(folder: Path) -> Dataset:
    """The BEIR folder, checked: a clear error names the file and line that is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(str(folder), "is not a folder (a BEIR dataset: corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    corpus = {}
    for row in _jsonl(folder / "corpus.jsonl"):
        title = str(row.get("title") or "").strip()
        corpus[str(row["_id"])] = (f"{title}\n\n" if title else "") + row["text"].strip()
    queries = {str(row["_id"]): row["text"].strip() for row in _jsonl(folder / "queries.jsonl")}
    qrels_path = folder / "qrels" / "test.tsv"
    if not qrels_path.is_file():
        raise BadInput(str(qrels_path), "missing: the relevance judgements (query-id, corpus-id, score)")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(qrels_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.strip().split("\t")
        if not line.strip() or (number == 1 and not parts[-1].lstrip("-").isdigit()):
            continue   # the header line
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise BadInput(f"{qrels_path}:{number}", "expected query-id <tab> corpus-id <tab> integer score")
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    judged = {q: text for q, text in queries.items() if q in qrels}
    if not judged:
        raise BadInput(str(qrels_path), "judges none of the queries in queries.jsonl")
    return Dataset(folder.resolve().name, corpus, judged, qrels)


def default_collection(dataset: Dataset) -> str:
    return "eval-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", dataset.name).strip("-") or "dataset")


def passage_files(dataset: Dataset, root: Path) -> tuple[list[Path], dict[str, str]]:
    """One markdown file per passage under `root` (rewritten only when its text changed, so a re-run ingests
    nothing new); returns the files and file stem -> passage id."""
    root.mkdir(parents=True, exist_ok=True)
    files, ids = [], {}
    for index, (pid, text) in enumerate(dataset.corpus.items()):
        path = root / f"p{index:07d}.md"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        files.append(path)
        ids[path.stem] = pid
    (root / "ids.json").write_text(json.dumps(ids))
    return files, ids


def _ranking(sources: list[dict[str, Any]], ids: dict[str, str]) -> dict[str, float]:
    """Passage id -> score by rank (first chunk of a passage counts), for ir-measures."""
    run: dict[str, float] = {}
    for rank, source in enumerate(sources):
        pid = ids.get(Path(str(source.get("key") or "")).stem)
        if pid is not None and pid not in run:
            run[pid] = float(DEPTH - rank)
    return run


def bm25_runs(texts: dict[str, list[str]], queries: dict[str, str]) -> dict[str, dict[str, float]]:
    """BM25 (Okapi) over the collection's chunk texts, grouped by passage: each passage scores its best chunk."""
    from rank_bm25 import BM25Okapi

    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    owners, docs = [], []
    for pid, chunks in texts.items():
        for chunk in chunks:
            owners.append(pid)
            docs.append(tokens(chunk))
    index = BM25Okapi(docs)
    runs = {}
    for qid, query in queries.items():
        scores = index.get_scores(tokens(query))
        best: dict[str, float] = {}
        for pid, score in zip(owners, scores):
            if score > best.get(pid, float("-inf")):
                best[pid] = float(score)
        runs[qid] = dict(sorted(best.items(), key=lambda kv: -kv[1])[:DEPTH])
    return runs


def measures(top_k: int) -> list[Any]:
    from ir_measures import RR, R, nDCG

    return [nDCG @ top_k, R @ top_k, R @ DEPTH, RR @ top_k]


def score(qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, dict[str, float]]], top_k: int
          ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """(system -> measure -> mean, system -> query -> measure -> value)."""
    import ir_measures

    wanted = measures(top_k)
    means, per_query = {}, {}
    for system, run in runs.items():
        judged = {q: qrels[q] for q in run}
        means[system] = {str(m): float(v) for m, v in ir_measures.calc_aggregate(wanted, judged, run).items()}
        per_query[system] = {}
        for metric in ir_measures.iter_calc(wanted, judged, run):
            per_query[system].setdefault(metric.query_id, {})[str(metric.measure)] = float(metric.value)
    return means, per_query


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def evaluate(client: Any, folder: Path, *, collection: str | None = None, top_k: int = 10, timeout_s: float = 600,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Ingest (or reuse) the dataset's passages, ask its queries through the stack, score three systems."""
    from sqlalchemy import text

    from ragq.core.keys import check_collection

    if not 1 <= top_k <= DEPTH:
        raise BadInput("--top-k", f"{top_k} is outside 1..{DEPTH}")
    dataset = load_dataset(folder)
    collection = check_collection(collection or default_collection(dataset))
    step = progress or (lambda stage, done, total: None)
    files, ids = passage_files(dataset, client.settings.home / "eval" / collection)
    t0 = time.monotonic()
    submission = client.submit_ingest(files, collection=collection, sync=True)
    status = client.wait_for_job(submission.job_id, timeout_s=timeout_s,
                                 on_progress=lambda s: step("ingest", s["documents_done"] + s["documents_failed"],
                                                            s["documents_total"]))
    ingest = {"seconds": time.monotonic() - t0, "documents": status["documents_total"],
              "chunks": status["chunks_total"], "chunks_added": status["chunks_added"], "status": status["status"]}
    if status["status"] != "completed":
        raise BadInput(str(folder), f"ingesting its passages ended {status['status']}: see `ragq job "
                                    f"{submission.job_id}`")
    runs: dict[str, dict[str, dict[str, float]]] = {"ragq": {}, "exact": {}}
    latencies: list[float] = []
    for number, (qid, query) in enumerate(dataset.queries.items(), 1):
        reply = client.ask(query, top_k=DEPTH, collection=collection, retrieve_only=True, exact=True,
                           timeout_s=timeout_s)
        latencies.append(float(reply["total_ms"]))
        runs["ragq"][qid] = _ranking(reply["sources"], ids)
        runs["exact"][qid] = _ranking(reply.get("exact") or [], ids)
        step("queries", number, len(dataset.queries))
    with client.db.connect() as conn:
        rows = conn.execute(text(
            "SELECT k.key, c.text FROM doc_keys k JOIN chunks c ON c.document_id = k.document_id "
            "WHERE k.collection = :c ORDER BY k.key, c.seq"), {"c": collection}).all()
    texts: dict[str, list[str]] = {}
    for key, chunk in rows:
        pid = ids.get(Path(key).stem)
        if pid is not None:
            texts.setdefault(pid, []).append(chunk)
    runs["bm25"] = bm25_runs(texts, dataset.queries)
    means, per_query = score(dataset.qrels, runs, top_k)
    ndcg = str(measures(top_k)[0])
    return {
        "dataset": str(Path(folder).resolve()), "collection": collection, "top_k": top_k, "depth": DEPTH,
        "passages": len(dataset.corpus), "queries": len(dataset.queries), "ingest": ingest,
        "measures": means,
        "ragq_over_exact": {m: (means["ragq"][m] / means["exact"][m]) if means["exact"][m] else None
                            for m in means["ragq"]},
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                       "p99": percentile(latencies, 0.99), "mean": statistics.fmean(latencies)},
        "per_query": {qid: {"query": dataset.queries[qid], "latency_ms": latencies[i],
                            **{system: per_query[system].get(qid, {}) for system in runs}}
                      for i, qid in enumerate(dataset.queries)},
        "primary": ndcg,
        "runs": {system: {qid: list(ranked) for qid, ranked in run.items()} for system, run in runs.items()},
    }


def render_html(result: dict[str, Any]) -> str:
    names = list(next(iter(result["measures"].values())))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(system)}</td>" + "".join(f"<td>{values[n]:.4f}</td>" for n in names) + "</tr>"
        for system, values in result["measures"].items())
    worst = sorted(result["per_query"].items(), key=lambda kv: kv[1]["ragq"].get(result["primary"], 0.0))[:20]
    queries = "".join(
        f"<tr><td>{html.escape(qid)}</td><td style='text-align:left'>{html.escape(q['query'])}</td>"
        + "".join(f"<td>{q[s].get(result['primary'], 0.0):.3f}</td>" for s in result["measures"])
        + f"<td>{q['latency_ms']:.0f}</td></tr>" for qid, q in worst)
    latency = result["latency_ms"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ragq eval</title><style>{style}</style></head>"
            f"<body><h1>ragq eval: {html.escape(result['collection'])}</h1>"
            f"<p>{result['passages']} passages, {result['queries']} queries, {result['depth']} passages deep; "
            f"latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms</p>"
            f"<table><tr><th>system</th>{head}</tr>{rows}</table>"
            f"<h2>Lowest {html.escape(result['primary'])} (ragq)</h2><table><tr><th>query</th><th>text</th>"
            + "".join(f"<th>{html.escape(s)}</th>" for s in result["measures"])
            + f"<th>ms</th></tr>{queries}</table></body></html>")
