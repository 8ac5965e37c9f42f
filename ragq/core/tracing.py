"""OpenTelemetry tracing: spans for each stage (embed, search, rerank, generate, chunk, store) and one trace per
question or ingestion job across the Celery chain (the OpenTelemetry Celery instrumentation carries the context in
task headers). RAGQ_TRACING=off (the default) installs nothing: the API's no-op tracer costs a function call per
stage. `console` writes one JSON span per line (to RAGQ_TRACE_FILE, else stderr); `otlp` exports over OTLP/HTTP
to RAGQ_OTLP_ENDPOINT."""

from __future__ import annotations

import atexit
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ragq.core.errors import ConfigError

log = logging.getLogger(__name__)
_enabled = False


def setup(settings: Any, service: str) -> bool:
    """Install the tracer provider and the Celery instrumentation for this process; once per process."""
    global _enabled
    if settings.tracing == "off" or _enabled:
        return _enabled
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if settings.tracing == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        try:
            out = open(settings.trace_file, "a", buffering=1) if settings.trace_file else sys.stderr  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"RAGQ_TRACE_FILE: cannot append to {settings.trace_file}: "
                              f"{exc.strerror or exc}") from None
        exporter: Any = ConsoleSpanExporter(
            out=out, formatter=lambda span: json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n")
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    atexit.register(provider.shutdown)
    _enabled = True
    log.info("tracing to %s as %s", settings.tracing, service)
    return True


def flush() -> None:
    if _enabled:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush(5000)  # type: ignore[attr-defined]


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named `name` (current context as parent); yields it, or None when tracing is off."""
    if not _enabled:
        yield None
        return
    from opentelemetry import trace

    with trace.get_tracer("ragq").start_as_current_span(name) as current:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(f"ragq.{key}", value)
        yield current
