"""Typed settings from RAGQ_* environment variables (and an optional .env file).

One `Settings` object is built at the edge (CLI, worker start-up) and passed down.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragq.core.errors import ConfigError
from ragq.core.sizes import parse_size


def _default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "ragq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGQ_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state of the embedded services and caches")
    broker_url: str | None = Field(None, description="Celery broker; unset = embedded Redis")
    result_backend: str | None = Field(None, description="Celery result backend; unset = the broker's Redis")
    database_url: str | None = Field(None, description="Postgres with pgvector; unset = embedded pgserver")
    redis_password: SecretStr | None = Field(
        None, description="password of the embedded Redis; unset = a random one made at its first start and kept "
        "in RAGQ_HOME/run (readable by the owner only)")
    models: Path | None = Field(None, description="models config file (TOML); unset = the CPU default")
    vram_budget: str | None = Field(None, description="explicit device budget, e.g. 16GiB; unset = memory x (1-buffer)")
    vram_buffer: float = Field(0.15, ge=0.0, lt=1.0, description="share of device memory kept free")
    cpu_budget: str = Field("4GiB", description="budget for models on the cpu device")
    host_budget: str | None = Field(None, description="pinned host RAM for sleeping models; unset = 25% of RAM")
    cooldown_s: float = Field(2.0, ge=0.0, description="minimum residency of a model while work needs it (an idle one is held only as long as "
                                     "bringing it back would take)")
    worker_concurrency: int = Field(8, ge=1, le=256, description="task threads consuming the background queue")
    urgent_concurrency: int = Field(
        20, ge=0, le=256, description="task threads of the worker's urgent consumer, a process of their own so that "
        "questions never wait for a thread held by ingestion (0 = one consumer for both queues)")
    visibility_timeout_s: int = Field(
        3600, ge=60, description="a task held this long without its worker's lease being refreshed runs again "
        "elsewhere (a worker that restarts puts back what it held at once)")
    lease_interval_s: float = Field(
        10.0, gt=0, description="how often a worker refreshes the broker entries of the tasks it holds")
    orphan_after_s: float | None = Field(
        None, gt=0, description="an unacked task message no consumer has refreshed this long is put back on its "
        "queue (its worker died before it could lease it, or never came back); at least 3 lease intervals; "
        "default 6 lease intervals, at least 60 s")
    flower_user: str | None = Field(None, description="`ragq flower` basic auth user (with RAGQ_FLOWER_PASSWORD)")
    flower_password: SecretStr | None = Field(None, description="`ragq flower` basic auth password")
    flower_auth: str | None = Field(
        None, description="`ragq flower` OAuth instead: a regex of the e-mail addresses let in (Flower's --auth; "
        "the provider from FLOWER_AUTH_PROVIDER, FLOWER_OAUTH2_KEY, FLOWER_OAUTH2_SECRET, FLOWER_OAUTH2_REDIRECT_URI)")
    flower_address: str = Field("127.0.0.1", description="`ragq flower` listens here (loopback unless set)")
    flower_port: int = Field(5555, ge=1, le=65535, description="`ragq flower` port")
    consumer_stall_s: float = Field(
        30.0, ge=0, description="a consumer with messages waiting on its queues, a free slot and nothing received "
        "for this long is made to reconnect, and exits to be restarted if that does not help (0 = never)")
    max_deliveries: int = Field(
        5, ge=1, description="a task started this many times without finishing (its worker died each time: a "
        "message that kills its worker) fails with its error instead of running again")
    switch_interval_ms: float | None = Field(
        None, gt=0, le=100, description="the worker's GIL switch interval (Python's default is 5 ms); lower lets "
        "the device loop win the GIL sooner from busy task threads")
    urgent_yield_s: float = Field(
        10.0, ge=0, description="for this long after an urgent request, background micro-batches run shorter "
        "(see RAGQ_URGENT_YIELD_MS), so questions wait behind shorter batches (0 = never)")
    prewarm_generator: bool = Field(
        True, description="wake the generator as soon as an urgent question is embedded, while its search and "
        "rerank run (where the budget holds the embedder or the generator, not both, that wake would come moments "
        "later anyway); false: when its rerank is done")
    idle_restore_s: float = Field(
        1.0, ge=0, description="a worker with nothing to do for this long brings the embedder back if it went "
        "to sleep for the generator (where the budget holds one of them), so the next question's first stage does "
        "not wait for its wake (0 = never)")
    urgent_yield_ms: float = Field(
        150.0, ge=0, description="while urgent work is recent, background micro-batches are sized from their "
        "measured rate to take about this long, at most half their tuned size (0 = half their tuned size)")
    metrics_port: int = Field(
        9400, ge=-1, le=65535, description="the worker's Prometheus endpoint (0 = any free port, -1 = none); "
        "`--device all` uses this port + the GPU index")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint listens on")
    alert_interval_s: float = Field(30.0, gt=0, description="how often `ragq beat` has the alerts evaluated")
    alert_window_s: float = Field(300.0, gt=0, description="the error-rate alert's window")
    alert_queue_for_s: float = Field(
        300.0, ge=0, description="how long queue time must exceed compute time before that alert fires")
    tune_interval_s: float = Field(60.0, ge=0, description="how often `ragq beat` runs the tuner (0 = never)")
    tune_window_s: float = Field(300.0, gt=0, description="the evidence window of each tuner step")
    tune_settle_s: float = Field(120.0, ge=0, description="a knob moved less than this long ago is left alone")
    tune_generate_p95_ms: float = Field(
        4000.0, gt=0, description="generation p95 above this is the 'high generation latency' symptom")
    tuning_pinned: str = Field("", description="comma-separated knobs the tuner never moves, e.g. "
                               "cooldown_s,max_new_tokens")
    tracing: Literal["off", "console", "otlp"] = Field(
        "off", description="OpenTelemetry spans: off, console (JSON lines), or otlp (OTLP/HTTP)")
    trace_file: Path | None = Field(None, description="with tracing=console: append spans here (default stderr)")
    otlp_endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="with tracing=otlp: the collector")
    stats_interval_s: float = Field(
        30.0, ge=0, description="how often the engine logs a line of what its batches did (0 = never)")
    chunk_processes: int | None = Field(
        None, ge=0, le=64, description="processes chunking documents off the GIL; unset = 0 on cpu, cores/4 on a GPU")
    ingest_batch_docs: int = Field(8, ge=1, description="at most this many documents per background ingest task")
    ingest_task_tokens: int = Field(
        8192, ge=256, description="about this many tokens of text per ingest task, so one task is about one "
        "micro-batch of engine work and a task thread frees up for an urgent question every micro-batch")
    ask_timeout_s: float = Field(60.0, gt=0)
    top_k: int = Field(5, ge=1, le=100)
    rerank_candidates: int = Field(20, ge=1, le=1000, description="passages the reranker sees per question")
    torch_threads: int = Field(0, ge=0, le=256, description="torch's intra-op threads in a CPU engine (0: half "
                               "the cores the worker may use)")
    preload: str = Field("auto", description="roles whose models the engine loads at start, while the consumers "
                         "start (comma-separated; empty: every model on first use; auto: the embedder on a GPU, "
                         "nothing on the CPU, where loading beside the consumers' start-up slows both)")
    hnsw_ef_search: int = Field(400, ge=10, le=1000, description="the least candidates an HNSW search keeps "
                                "(pgvector's hnsw.ef_search); raised for a collection that is a small part of the "
                                "table, since pgvector filters by collection after the index scan")
    exact_search_under: int = Field(50_000, ge=0, description="a collection with fewer chunks than this is searched "
                                    "exactly (every chunk compared): as fast there, and nothing is missed")
    question_batch: int = Field(16, ge=1, le=1000, description="background questions per task (`ragq questions`)")
    # host RAM plan (the reference box): what runs on this host beside its workers, checked at `ragq worker` start
    host_services: str = Field("", description="comma-separated services on this host: redis, postgres, docling, "
                                               "triton, monitoring (empty: only the workers are counted)")
    ram_redis: str = Field("8GiB", description="host RAM planned for Redis (its maxmemory plus overhead)")
    ram_postgres: str = Field("8GiB", description="host RAM planned for Postgres")
    ram_docling: str = Field("4GiB", description="host RAM planned for Docling conversion")
    ram_triton: str = Field("2GiB", description="host RAM planned for the Triton server")
    ram_monitoring: str = Field("4GiB", description="host RAM planned for Prometheus and Grafana")
    ram_worker: str = Field("2GiB", description="host RAM of one worker's processes, besides its pinned-model tier")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    celery_profile: Literal["ragq", "celery-defaults"] = Field(
        "ragq", description="celery-defaults = round-robin queues, prefetch 4, early acks: the benchmarks' baseline")

    @field_validator("vram_budget", "cpu_budget", "host_budget", "ram_redis", "ram_postgres", "ram_docling",
                     "ram_triton", "ram_monitoring", "ram_worker")
    @classmethod
    def _size_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("redis_password")
    @classmethod
    def _password_is_one_word(cls, value: SecretStr | None) -> SecretStr | None:
        # it goes into redis-server's config file as `requirepass <password>`: a space or a line break would end
        # it there, or add configuration lines of its own
        if value is not None and any(c.isspace() or not c.isprintable() for c in value.get_secret_value()):
            raise ValueError("must not contain spaces, line breaks or other unprintable characters")
        return value

    @field_validator("models")
    @classmethod
    def _models_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"models file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _leases_refresh_within_the_timeout(self) -> Settings:
        if self.lease_interval_s >= self.visibility_timeout_s:
            raise ValueError(f"RAGQ_LEASE_INTERVAL_S ({self.lease_interval_s:g}) must be shorter than "
                             f"RAGQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s})")
        if self.orphan_after_s is not None and self.orphan_after_s < 3 * self.lease_interval_s:
            raise ValueError(f"RAGQ_ORPHAN_AFTER_S ({self.orphan_after_s:g}) must be at least 3 lease intervals "
                             f"(RAGQ_LEASE_INTERVAL_S={self.lease_interval_s:g}): a live worker's tasks would be "
                             "put back while it runs them")
        return self

    @property
    def orphan_after(self) -> float:
        """Seconds after which an unacked message nobody refreshes is put back (workers/leases.py)."""
        return self.orphan_after_s if self.orphan_after_s is not None else max(60.0, 6 * self.lease_interval_s)

    @cached_property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def embedded(self) -> bool:
        """True when some service has no URL configured and ragq must run it itself."""
        return self.broker_url is None or self.database_url is None


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's validation error into a ConfigError that names the variable."""
    from pydantic import ValidationError


    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            (f"RAGQ_{'_'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "") + err["msg"]
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
