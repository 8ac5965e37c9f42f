"""The host RAM plan: what a host must hold — the services that run on it (RAGQ_HOST_SERVICES, each with its
planned size, RAGQ_RAM_<SERVICE>) and each of its workers (its processes, RAGQ_RAM_WORKER, plus its pinned-model
tier, RAGQ_HOST_BUDGET) — against the host's RAM. `ragq worker` checks it before starting anything and refuses
(exit 2) with a table of what does not fit. Reference box: Redis 4-8 GB, Postgres 8 GB, Docling 2-4 GB, Triton
1-2 GB, monitoring 2-4 GB."""

from __future__ import annotations

from typing import Any

from ragq.core.errors import ConfigError
from ragq.core.sizes import format_size, parse_size

SERVICES = ("redis", "postgres", "docling", "triton", "monitoring")


def planned(settings: Any, workers: int, pinned_per_worker: int) -> list[tuple[str, int]]:
    """[(what, bytes)] this host must hold."""
    names = [n.strip().lower() for n in settings.host_services.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise ConfigError(f"RAGQ_HOST_SERVICES: unknown service {', '.join(unknown)}; the services are "
                          f"{', '.join(SERVICES)}")
    rows = [(name, parse_size(getattr(settings, f"ram_{name}"))) for name in dict.fromkeys(names)]
    worker = parse_size(settings.ram_worker)
    for index in range(workers):
        rows.append((f"worker {index}: processes", worker))
        rows.append((f"worker {index}: pinned-model tier (RAGQ_HOST_BUDGET)", pinned_per_worker))
    return rows


def check_host_ram(settings: Any, workers: int, pinned_per_worker: int, total_bytes: int | None = None) -> int:
    """Raise ConfigError, naming what does not fit, when the plan exceeds the host's RAM; returns the bytes left."""
    if total_bytes is None:
        import psutil

        total_bytes = int(psutil.virtual_memory().total)
    rows = planned(settings, workers, pinned_per_worker)
    need = sum(size for _, size in rows)
    if need <= total_bytes:
        return total_bytes - need
    table = "\n".join(f"  {size / 2**30:7.2f} GiB  {what}" for what, size in rows)
    raise ConfigError(
        f"host RAM does not cover this host's plan: it needs {format_size(need)} and the host has "
        f"{format_size(total_bytes)} ({format_size(need - total_bytes)} short):\n{table}\n"
        "lower RAGQ_HOST_BUDGET (the pinned-model tier) or a service's RAGQ_RAM_<SERVICE>, or run fewer services "
        "or workers on this host (RAGQ_HOST_SERVICES)")
