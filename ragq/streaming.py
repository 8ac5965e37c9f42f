"""Answers as they are generated: `Client.ask_stream` reads the question's Redis stream (ragq.core.streams) while
the question is answered, and yields its pieces, then the reply."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from ragq.core.streams import new_stream_key, read_pieces, wake_reader


def ask_stream(client: Any, question: str, *, timeout_s: float | None = None, top_k: int | None = None,
               max_new_tokens: int | None = None, collection: str | None = None
               ) -> Iterator[str | dict[str, Any]]:
    """`ask`, streamed: yields the answer's text pieces as the generator writes them (through a Redis stream
    of the broker), then the whole reply (the dict `ask` returns, with `first_token_ms`: from the call to the
    first piece). The pieces concatenate to the reply's answer; an answer that was not generated (extractive,
    none) comes as one piece."""
    key = new_stream_key()
    box: dict[str, Any] = {}
    done = threading.Event()

    def wait() -> None:
        try:
            box["reply"] = client.ask(question, timeout_s=timeout_s, top_k=top_k, max_new_tokens=max_new_tokens,
                                      stream=key, collection=collection)
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = exc
        finally:
            done.set()
            try:
                wake_reader(client._redis, key)   # the reader below is blocked on the stream: the reply is in
            except Exception:  # noqa: BLE001 - it then wakes at its block's end
                pass

    started = time.time()
    waiter = threading.Thread(target=wait, name="ragq-ask", daemon=True)
    waiter.start()
    last, sent, first_at, grace_until = "0-0", "", None, None
    try:
        while True:
            if done.is_set():
                reply = box.get("reply")
                # an answer that was not generated (extractive, none) was never streamed: nothing to wait for
                answer = reply["answer"] if reply is not None and reply.get("mode") == "generated" else None
                grace_until = grace_until or time.time() + 1.0
                # the reply is in: read on until the stream has all of it (its last pieces may still be on their
                # way), or it has nothing more; what is missing then comes whole below
                if answer is None or answer == sent or not answer.startswith(sent) or time.time() > grace_until:
                    break
            last, pieces = read_pieces(client._redis, key, last, 20)   # short: the reply ends the wait
            for piece in pieces:
                first_at = first_at or time.time()
                sent += piece
                yield piece
        waiter.join()
        if "error" in box:
            raise box["error"]
        reply = box["reply"]
        if reply["answer"] != sent:
            rest = reply["answer"][len(sent):] if reply["answer"].startswith(sent) else "\n" + reply["answer"]
            first_at = first_at or time.time()
            yield rest
        reply["first_token_ms"] = round((first_at - started) * 1000.0, 2) if first_at else None
        yield reply
    finally:
        client._redis.delete(key)
