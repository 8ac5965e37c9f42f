"""Measured model footprints: weights bytes at load and activation peaks per (batch size, padded tokens).

The engine plans with these instead of configured guesses; the Postgres store persists them (model_profiles) so
the next start plans with what the last one measured. Writes go through a background thread: a database outage
delays them and never blocks the device loop.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ragq.core.db import ModelProfileRow, get_engine
from scheduler.footprints import ModelProfile, token_bucket

log = logging.getLogger(__name__)


class ProfileStore(Protocol):
    def get(self, model: str, device_kind: str, dtype: str) -> ModelProfile | None: ...

    def put(self, profile: ModelProfile) -> None: ...


class MemoryProfileStore:
    def __init__(self) -> None:
        self._profiles: dict[tuple[str, str, str], ModelProfile] = {}
        self._lock = threading.Lock()

    def get(self, model: str, device_kind: str, dtype: str) -> ModelProfile | None:
        with self._lock:
            return self._profiles.get((model, device_kind, dtype))

    def put(self, profile: ModelProfile) -> None:
        with self._lock:
            self._profiles[(profile.model, profile.device_kind, profile.dtype)] = profile


class PostgresProfileStore(MemoryProfileStore):
    """Reads every profile once at start; writes each change with an upsert from a background thread."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        self.database_url = database_url
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ragq-profiles")
        self._load_all()

    def _load_all(self) -> None:
        from sqlalchemy import select


        try:
            with get_engine(self.database_url).connect() as conn:
                for row in conn.execute(select(ModelProfileRow.__table__)).mappings():
                    super().put(ModelProfile(row["model"], row["device_kind"], row["dtype"], row["weights_bytes"],
                                             dict(row["activations"] or {}), row["tuned_batch"]))
        except Exception as exc:
            log.warning("could not read model profiles (planning with configured estimates): %s", exc)

    def put(self, profile: ModelProfile) -> None:
        snapshot = ModelProfile(profile.model, profile.device_kind, profile.dtype, profile.weights_bytes,
                                dict(profile.activations), profile.tuned_batch)
        super().put(snapshot)
        self._writer.submit(self._write, snapshot)

    def _write(self, profile: ModelProfile) -> None:
        from sqlalchemy import func
        from sqlalchemy.dialects.postgresql import insert


        values = {"model": profile.model, "device_kind": profile.device_kind, "dtype": profile.dtype,
                  "weights_bytes": profile.weights_bytes, "activations": profile.activations,
                  "tuned_batch": profile.tuned_batch}
        statement = insert(ModelProfileRow).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=["model", "device_kind", "dtype"],
            set_={"weights_bytes": statement.excluded.weights_bytes, "activations": statement.excluded.activations,
                  "tuned_batch": statement.excluded.tuned_batch,
                  "updated_at": func.now()},
        )
        try:
            with get_engine(self.database_url).begin() as conn:
                conn.execute(statement)
        except Exception as exc:
            log.warning("could not persist the profile of %s: %s", profile.model, exc)

    def flush(self) -> None:
        self._writer.submit(lambda: None).result(30)


__all__ = ["MemoryProfileStore", "ModelProfile", "PostgresProfileStore", "ProfileStore", "token_bucket"]
