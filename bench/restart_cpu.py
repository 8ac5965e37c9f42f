"""How fast a worker consumes again (issue [6 of 7]): start-to-consuming and kill-to-consuming of a real
`ragq worker --device cpu` on embedded Redis and Postgres, over N restarts, idle or with busy processes beside it,
for one or more source trees side by side in one run (a worktree of an older commit as "before").

"Consuming" is what a user waits for: both of the worker's Celery consumers (background, urgent) answer a ping.
After each SIGKILL a question is asked at once and again every 0.2 s while the client says no consumer is there
(it refuses at once then), and the time from the kill until it is answered is the recovery a user sees; a
replacement is started right after the kill, as a supervisor would.

    python bench/restart_cpu.py --restarts 10 --busy 0,2 --trees before=/tmp/wt-old,after=. --out out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.drills import drill_services, kill_hard  # noqa: E402


def spin() -> None:
    while True:
        pass


EXTRA_ENV: dict[str, dict[str, str]] = {}   # label -> settings of that run (--env)


def start(tree: Path, home: Path, name: str, log: Path, label: str = "") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_")}
    env.update(RAGQ_HOME=str(home), PYTHONPATH=str(tree), RAGQ_METRICS_PORT="0", PYTHONUNBUFFERED="1")
    env.update(EXTRA_ENV.get(label, {}))
    return subprocess.Popen([sys.executable, "-m", "ragq.cli", "worker", "--device", "cpu", "--name", name],
                            env=env, cwd=tree, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            stdin=subprocess.DEVNULL)


def until_consuming(app: Any, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 300.0) -> float:
    t0 = time.monotonic()
    names = [f"{name}@{os.uname().nodename}", f"{name}-urgent@{os.uname().nodename}"]
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode}")
        if len(app.control.ping(destination=names, timeout=0.2)) == len(names):
            return time.monotonic() - t0
    raise RuntimeError("worker not consuming")


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "max": max(values), "n": len(values)}


def run_tree(label: str, tree: Path, client: Any, home: Path, restarts: int, env_label: str = "") -> dict[str, Any]:
    name = f"rs{label}"
    log = home / f"worker-{label}.log"
    starts, kills, answers = [], [], []
    proc = start(tree, home, name, log, env_label)
    starts.append(until_consuming(client.app, proc, name))
    client.ask("warm up the models", timeout_s=300)
    for _ in range(restarts):
        t_kill = time.monotonic()
        kill_hard(proc)
        answered: dict[str, float] = {}

        def ask(answered: dict[str, float] = answered) -> None:
            from ragq.core.errors import ServiceError

            t0 = time.monotonic()
            while time.monotonic() - t0 < 300:
                try:   # with no consumer the client refuses at once: ask again, as a user's retry would
                    client.ask("Which worker keeps the urgent questions fast?", timeout_s=300)
                    answered["s"] = time.monotonic() - t0
                    return
                except ServiceError:
                    time.sleep(0.2)

        asker = threading.Thread(target=ask)
        asker.start()
        proc = start(tree, home, name, log, env_label)
        starts.append(until_consuming(client.app, proc, name))
        kills.append(time.monotonic() - t_kill)
        asker.join(300)
        answers.append(answered.get("s", float("nan")))
    kill_hard(proc)
    return {"start_to_consuming_s": summary(starts), "kill_to_consuming_s": summary(kills),
            "question_asked_at_kill_answered_s": summary(answers), "raw": {"start": starts, "kill": kills,
                                                                         "answer": answers}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--busy", default="0,2", help="busy processes beside the worker, one run per value")
    parser.add_argument("--trees", default="after=.", help="label=source tree, comma separated")
    parser.add_argument("--env", action="append", default=[], help="LABEL:KEY=VALUE, a setting for one tree's runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for item in args.env:
        label, setting = item.split(":", 1)
        key, value = setting.split("=", 1)
        EXTRA_ENV.setdefault(label, {})[key] = value
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.trees.split(","))]
    from ragq.client import Client
    from ragq.demo import sample_paths

    here = Path(__file__).resolve().parent.parent / "migrations" / "versions"
    for _, tree in trees:   # the client here migrates to this tree's newest revision: an older tree gets the files
        for migration in here.glob("*.py"):   # it lacks (new tables it does not use), or its alembic would refuse
            if not (tree / "migrations" / "versions" / migration.name).exists():
                shutil.copy(migration, tree / "migrations" / "versions" / migration.name)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "restarts": args.restarts,
                           "runs": {}}
    home = Path(tempfile.mkdtemp(prefix="ragq-restart-"))
    settings, services = drill_services(home)   # one broker for all trees (Celery's app is one per process)
    try:
        client = Client(settings)
        job = client.submit_ingest(sample_paths()).job_id
        proc = start(trees[-1][1], home, "seed", home / "seed.log")
        until_consuming(client.app, proc, "seed")
        client.wait_for_job(job, timeout_s=600)
        kill_hard(proc)
        for busy in (int(b) for b in args.busy.split(",")):
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for s in spinners:
                s.start()
            try:
                for label, tree in trees:   # side by side, the same machine state
                    key = f"{label}, {busy} busy"
                    out["runs"][key] = run_tree(f"{label}{busy}", tree, client, home, args.restarts, label)
                    r = out["runs"][key]
                    print(f"{key}: start p50 {r['start_to_consuming_s']['p50']:.2f} s max "
                          f"{r['start_to_consuming_s']['max']:.2f}; kill p50 {r['kill_to_consuming_s']['p50']:.2f} "
                          f"max {r['kill_to_consuming_s']['max']:.2f}; question at kill p50 "
                          f"{r['question_asked_at_kill_answered_s']['p50']:.2f} s", flush=True)
            finally:
                for s in spinners:
                    s.kill()
    finally:
        services.down()
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
