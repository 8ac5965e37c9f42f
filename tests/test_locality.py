"""A question's four stages stay on the worker that took its first one; a worker that dies mid-question does not
leave the question to wait out its timeout. Two real workers on a Redis database of their own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, WorkerProcess, ragq_env, run_ragq

pytestmark = pytest.mark.integration

STAGES = ("embed", "search", "rerank", "generate")


ASK = """
import json, sys, threading, time
from ragq.client import Client
client = Client()
questions = json.loads(sys.argv[1])
out = [None] * len(questions)
def ask(i):
    try:
        out[i] = {"reply": client.ask(questions[i], timeout_s=60)}
    except Exception as exc:
        out[i] = {"error": f"{type(exc).__name__}: {exc}"}
    out[i]["at"] = time.monotonic()
threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
"""


def asking(env: dict[str, str], questions: list[str]) -> subprocess.Popen[str]:
    """A client process of its own (the Celery app is per process) asking `questions` at once."""
    return subprocess.Popen([sys.executable, "-c", ASK, json.dumps(questions)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def answers(process: subprocess.Popen[str], timeout_s: float = 120) -> list[dict[str, Any]]:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def two_workers(settings, tmp_path_factory):  # type: ignore[no-untyped-def]
    from celery import Celery

    from ragq.core.services import EmbeddedServices

    endpoints = EmbeddedServices(settings).up()
    broker = endpoints.broker_url.rsplit("/", 1)[0] + "/4"
    env = ragq_env(settings.home, RAGQ_BROKER_URL=broker, RAGQ_DATABASE_URL=endpoints.database_url)
    logs = tmp_path_factory.mktemp("locality")
    workers = [WorkerProcess(env, name, logs / f"{name}.log") for name in ("near", "far")]
    try:
        probe_app = Celery(broker=broker, backend=broker)
        for worker in workers:
            worker.wait_ready(probe_app)
        doc = logs / "tides.md"
        doc.write_text("# Tides\n\nThe harbour floods twice a day at spring tide.\n\n"
                       "## Boats\n\nFishing boats leave the harbour an hour before high water.\n")
        ingest = run_ragq(env, "ingest", str(doc), "--wait", "--json")
        assert ingest.returncode == 0, ingest.stderr
        yield env, workers
    finally:
        for worker in workers:
            worker.stop()


def _stage_workers(reply: dict[str, Any]) -> list[str]:
    return [reply["timings"][stage]["worker"] for stage in STAGES]


def test_all_four_stages_of_each_question_run_on_one_worker(two_workers) -> None:  # type: ignore[no-untyped-def]
    env, workers = two_workers
    questions = [f"When do the boats leave the harbour? ({i})" for i in range(12)]
    replies = answers(asking(env, questions))      # asked at once: both workers busy
    assert all("reply" in r for r in replies), [r.get("error") for r in replies]
    for result in replies:
        stage_workers = _stage_workers(result["reply"])
        assert len(set(stage_workers)) == 1, stage_workers     # embed, search, rerank, generate: one worker
        assert stage_workers[0].split("@")[0] in {f"{w.name}-urgent" for w in workers}


def _engine_process(worker: WorkerProcess) -> psutil.Process:
    """The worker's engine process, by the pid its log gives ("engine process for cpu started (pid N)")."""
    found = re.findall(r"engine process for \S+ started \(pid (\d+)\)", worker.log_path.read_text(errors="replace"))
    assert found, f"no engine process in {worker.log_path}"
    engine = psutil.Process(int(found[-1]))
    assert engine.ppid() == worker.proc.pid
    return engine


def test_a_question_whose_worker_dies_mid_question_is_asked_again_elsewhere(two_workers) -> None:  # type: ignore[no-untyped-def]
    """Both engines frozen: whichever urgent consumer takes the question's first stage holds it (waiting on its
    engine); that worker is killed. The question is answered by the other worker seconds later, not after its
    60 s timeout."""
    env, workers = two_workers
    engines = {w.name: _engine_process(w) for w in workers}
    for engine in engines.values():
        engine.send_signal(signal.SIGSTOP)

    def embeds(worker: WorkerProcess) -> int:
        return worker.log_path.read_text(errors="replace").count("ragq.query.embed[")

    before = {w.name: embeds(w) for w in workers}
    try:
        client = asking(env, ["How often does the harbour flood?"])
        holder = None
        deadline = time.monotonic() + 30
        while holder is None and time.monotonic() < deadline:
            holder = next((w for w in workers if embeds(w) > before[w.name]), None)
            time.sleep(0.1)
        assert holder is not None, "no worker took the question's first stage"
        other = next(w for w in workers if w is not holder)
        tree = psutil.Process(holder.proc.pid)
        for victim in [tree, *tree.children(recursive=True)]:   # the whole worker at once, as a crash takes it
            victim.kill()
        holder.proc.wait(30)
        killed = time.monotonic()
        engines[other.name].send_signal(signal.SIGCONT)
        (box,) = answers(client, 90)
    finally:
        for engine in engines.values():
            if engine.is_running():
                engine.send_signal(signal.SIGCONT)
    assert "error" not in box, box["error"]
    assert 0 < box["at"] - killed < 20                        # the heartbeat's 3 s, then the other worker's answer
    assert set(_stage_workers(box["reply"])) == {f"{other.name}-urgent@{os.uname().nodename}"}
