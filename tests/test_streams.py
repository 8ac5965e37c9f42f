"""The answer stream through the broker's Redis (a real one): pieces in order, and a reader blocked on a quiet
stream woken at once when the reply is in (Redis itself ends a blocked read only at its next cron tick, up to
100 ms late: streamed asks ended on a 100 ms grid)."""

from __future__ import annotations

import threading
import time

from ragq.core.streams import StreamWriter, new_stream_key, read_pieces, wake_reader


def test_pieces_come_in_order_joined_per_stream_and_a_wake_entry_is_no_piece(client) -> None:  # type: ignore[no-untyped-def]
    keys = [new_stream_key(), new_stream_key()]
    writer = StreamWriter(client.endpoints.broker_url)
    words = [f"w{i} " for i in range(200)]
    for word in words:   # two answers growing together, as two sequences of one decode step do
        for key in keys:
            writer(key, word)
    for key in keys:
        wake_reader(client._redis, key)
    for key in keys:
        got, last = "", "0-0"
        deadline = time.monotonic() + 10
        while got != "".join(words) and time.monotonic() < deadline:
            last, pieces = read_pieces(client._redis, key, last, 50)
            got += "".join(pieces)
        assert got == "".join(words)
        assert 0 < client._redis.ttl(key) <= 600       # it expires on its own
        client._redis.delete(key)


def test_pieces_queued_together_go_as_one_entry_per_stream() -> None:
    writer = StreamWriter("redis://unused")
    for piece in ("a", "b", "c"):
        writer._queue.put(("k1", piece))   # queued while its thread was writing the last batch
        writer._queue.put(("k2", piece.upper()))
    assert writer._take() == {"k1": "abc", "k2": "ABC"}


def test_a_blocked_reader_returns_when_woken(client) -> None:  # type: ignore[no-untyped-def]
    key = new_stream_key()
    client._redis.xadd(key, {"p": "x"})
    last, _ = read_pieces(client._redis, key, "0-0", 10)
    returned: list[float] = []

    def read() -> None:
        read_pieces(client._redis, key, last, 30_000)   # would block for 30 s
        returned.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()
    wake_reader(client._redis, key)
    reader.join(timeout=20)
    assert returned, "the reader was not woken"
    client._redis.delete(key)
