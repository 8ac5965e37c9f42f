"""`ragq flower`: a real Flower on the session's broker, with the session's worker; never without authentication."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ragq.core.services import _free_port
from tests.conftest import ROOT, ragq_env, run_chromium, run_ragq

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "flower-Pa55:word"


class FlowerProcess:
    def __init__(self, home: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = ragq_env(home, RAGQ_FLOWER_USER=USER, RAGQ_FLOWER_PASSWORD=PASSWORD, RAGQ_FLOWER_PORT=str(self.port))
        self.proc = subprocess.Popen([sys.executable, "-m", "ragq.cli", "flower", *args], env=env, cwd=ROOT,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                requests.get(self.url + "/healthcheck", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.3)
        raise RuntimeError("flower did not start")

    def workers(self) -> dict[str, object]:
        """/api/workers with the credentials, once Flower has heard from the workers."""
        deadline = time.monotonic() + 60
        while True:
            reply = requests.get(self.url + "/api/workers", auth=(USER, PASSWORD), params={"refresh": "1"}, timeout=30)
            assert reply.status_code == 200, reply.text
            if reply.json() or time.monotonic() > deadline:
                return dict(reply.json())
            time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def flower(ragq_home: Path, worker, tmp_path_factory) -> Iterator[FlowerProcess]:  # type: ignore[no-untyped-def]
    proc = FlowerProcess(ragq_home, tmp_path_factory.mktemp("flower") / "flower.log", "--read-only")
    try:
        yield proc
    finally:
        proc.stop()


def test_flower_answers_only_with_credentials_and_lists_ragqs_worker(flower: FlowerProcess, worker) -> None:  # type: ignore[no-untyped-def]
    assert requests.get(flower.url + "/api/workers", timeout=10).status_code == 401
    assert requests.get(flower.url + "/api/workers", auth=(USER, "wrong"), timeout=10).status_code == 401
    assert requests.get(flower.url + "/", timeout=10).status_code == 401          # the pages too
    workers = flower.workers()
    assert any(name.startswith(f"{worker.name}@") for name in workers), list(workers)
    deadline = time.monotonic() + 60
    while True:   # the page lists workers Flower has heard from through their events (heartbeats every 2 s)
        page = requests.get(flower.url + "/", auth=(USER, PASSWORD), timeout=10)
        assert page.status_code == 200
        if worker.name in page.text or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert worker.name in page.text
    queues = requests.get(flower.url + "/api/queues/length", auth=(USER, PASSWORD), timeout=10).json()
    assert {q["name"] for q in queues["active_queues"]} >= {"urgent", "background"}


def test_read_only_flower_refuses_every_action(flower: FlowerProcess, worker) -> None:  # type: ignore[no-untyped-def]
    host = next(iter(flower.workers()))
    for path in ("/api/task/revoke/some-task", f"/api/worker/shutdown/{host}", f"/api/worker/pool/grow/{host}",
                 "/api/task/async-apply/ragq.probe", f"/api/worker/queue/cancel-consumer/{host}"):
        assert requests.post(flower.url + path, timeout=10).status_code == 401, path   # a stranger: 401
        reply = requests.post(flower.url + path, auth=(USER, PASSWORD), timeout=10)
        assert reply.status_code == 403 and "read-only" in reply.text, (path, reply.status_code, reply.text)
    assert worker.proc.poll() is None   # the worker is still there


def test_the_password_is_not_logged_and_not_on_the_command_line(flower: FlowerProcess) -> None:
    import psutil

    assert PASSWORD not in " ".join(psutil.Process(flower.proc.pid).cmdline())
    log = flower.log.read_text(errors="replace")
    assert "Visit me at" in log and PASSWORD not in log and "redis://:**@" in log


def test_flower_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    result = run_ragq(ragq_env(tmp_path / "home"), "flower", timeout=60)
    assert result.returncode == 2
    assert "Flower runs only with authentication" in result.stderr
    assert not (tmp_path / "home" / "pgdata").exists()   # refused before starting anything
    half = run_ragq(ragq_env(tmp_path / "home", RAGQ_FLOWER_USER="ops"), "flower", timeout=60)
    assert half.returncode == 2 and "go together" in half.stderr


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_chromium(tmp_path, "--virtual-time-budget=10000", *args)   # Flower's pages fill in by script


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian chromium is not installed")
def test_a_screenshot_of_flower_shows_ragqs_workers_and_queues(flower: FlowerProcess, worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium, logged in, renders Flower's workers and broker pages with ragq's worker and both queues;
    the screenshots are the README's (RAGQ_SCREENSHOT_DIR=docs writes them there)."""
    import os
    import shutil
    from urllib.parse import quote

    from PIL import Image

    flower.workers()
    base = f"http://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{flower.port}"
    dom = _chromium(tmp_path, "--dump-dom", base + "/workers")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"{worker.name}@" in dom.stdout
    broker = _chromium(tmp_path, "--dump-dom", base + "/broker")
    assert "urgent" in broker.stdout and "background" in broker.stdout, broker.stdout[-2000:]
    for page in ("workers", "broker"):
        shot = tmp_path / f"flower-{page}.png"
        _chromium(tmp_path, "--window-size=1280,720", f"--screenshot={shot}", f"{base}/{page}")
        with Image.open(shot) as image:
            assert image.size == (1280, 720)
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 30   # a rendered page, not a blank or an error
        if os.environ.get("RAGQ_SCREENSHOT_DIR"):
            shutil.copyfile(shot, Path(os.environ["RAGQ_SCREENSHOT_DIR"]) / shot.name)
