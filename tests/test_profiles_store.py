"""Model profiles persist in Postgres: what one worker measured and learnt (weights, activation peaks, the tuned
batch size) is what the next worker plans with."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.integration


def test_profiles_round_trip_through_postgres(db_engine, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from ragq.core.services import ensure_services
    from workers.profiles import ModelProfile, PostgresProfileStore

    url = ensure_services(settings).database_url
    name = f"profile-test-{uuid.uuid4().hex[:8]}"
    first = PostgresProfileStore(url)
    profile = ModelProfile(name, "NVIDIA H200", "bfloat16", 8 * 2**30)
    profile.observe(64, 200, 900 * 2**20)
    profile.tuned_batch = 61
    first.put(profile)
    first.flush()
    later = PostgresProfileStore(url)  # a new worker reads every profile at start
    loaded = later.get(name, "NVIDIA H200", "bfloat16")
    assert loaded is not None
    assert (loaded.weights_bytes, loaded.tuned_batch) == (8 * 2**30, 61)
    assert loaded.activation_for(64, 200) == 900 * 2**20
    with db_engine.begin() as conn:
        conn.execute(text("DELETE FROM model_profiles WHERE model = :m"), {"m": name})
