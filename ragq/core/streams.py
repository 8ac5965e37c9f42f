"""Answers streamed through the broker's Redis: one stream per question, written by the engine as the answer grows
(`ragq:answer:<id>`, entries {"p": piece}), read by the client that asked; it expires on its own."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "ragq:answer:"
TTL_S = 600          # a stream nobody reads goes away after this long
MAX_ENTRIES = 20_000


def new_stream_key() -> str:
    return PREFIX + uuid.uuid4().hex


class StreamWriter:
    """`writer(key, piece)` queues the piece; a thread appends the queued pieces to their streams in one pipeline
    (so a slow Redis never stalls the decode loop that calls it): the pieces of one stream queued together as one
    entry, and a stream's expiry set once, when it is first written. That thread shares the engine's GIL with the
    decode loop: with 16 answers in flight, a command per piece and an expiry per flush were 32 commands to build
    in Python after every decode step."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._expiring: dict[str, None] = {}   # streams whose expiry is set (the newest few thousand)

    def __call__(self, key: str, piece: str) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ragq-streams", daemon=True)
                    self._thread.start()
        self._queue.put((key, piece))

    def _take(self) -> dict[str, str]:
        """Everything queued (waiting for the first), joined per stream in order."""
        key, piece = self._queue.get()
        joined = {key: piece}
        while True:
            try:
                key, piece = self._queue.get_nowait()
            except queue.Empty:
                return joined
            joined[key] = joined.get(key, "") + piece

    def _run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        while True:
            joined = self._take()
            try:
                pipe = client.pipeline(transaction=False)
                for key, text in joined.items():
                    pipe.xadd(key, {"p": text}, maxlen=MAX_ENTRIES, approximate=True)
                new = [key for key in joined if key not in self._expiring]
                for key in new:
                    pipe.expire(key, TTL_S)
                pipe.execute()
                for key in new:
                    self._expiring[key] = None
                while len(self._expiring) > 4096:
                    del self._expiring[next(iter(self._expiring))]
            except Exception as exc:  # noqa: BLE001 - the answer still arrives whole; only the stream lags
                log.warning("could not stream %d pieces: %s", len(joined), exc)


def wake_reader(client: Any, key: str) -> None:
    """Append an entry with no piece: a reader blocked on the stream returns now. (Redis ends a blocked read's
    timeout only at its next cron tick — every 100 ms at the default `hz` — so a reader waiting out a short block
    on a quiet stream waits up to 100 ms, whatever the block asked for.)"""
    client.xadd(key, {"wake": "1"}, maxlen=MAX_ENTRIES, approximate=True)
    client.expire(key, TTL_S)


def read_pieces(client: Any, key: str, last_id: str, block_ms: int) -> tuple[str, list[str]]:
    """The pieces after `last_id` (waiting up to `block_ms` for the first), and the id to read on from."""
    reply = client.xread({key: last_id}, block=block_ms)
    pieces: list[str] = []
    for _, entries in reply or ():
        for entry_id, fields in entries:
            last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            value = fields.get(b"p", fields.get("p"))
            if value is not None:   # not a wake_reader entry
                pieces.append(value.decode() if isinstance(value, bytes) else str(value))
    return last_id, pieces

