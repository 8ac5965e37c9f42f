"""Triton backend: ragq's models served by an NVIDIA Triton Inference Server, through tritonclient (HTTP or gRPC).

The server runs in explicit model-control mode over a model repository that ragq writes (`write_model`): for each
model a config.pbtxt — Python backend, `dynamic_batching` with preferred batch sizes, a queue delay and two
priority levels (urgent 1, background 2), one instance on the engine's device — and a `model.py`
(workers/backends/triton_model.py) that runs the same torch code as the torch backend. The engine's residency
decisions drive the repository API: a load is `load_model`, an eviction `unload_model` (Triton keeps no host copy, so
a sleep unloads and a wake loads again). The footprint is what model.py measured (the weights' bytes, as the torch
backend measures them) and the load time is the repository call's.

Configuration: `backend = "triton"` in a model's table of the models file; RAGQ_TRITON_URL (`http://host:8000` or
`grpc://host:8001`) and RAGQ_TRITON_REPOSITORY (the directory the server was started with), or `triton_url` /
`triton_repository` in the model's table. Triton's /metrics are folded into ragq's (`TritonMetricsCollector`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragq.core.errors import BackendUnavailable, ModelLoadFailed
from workers.backends import BatchOutput, ModelBase
from workers.models import ModelSpec

log = logging.getLogger(__name__)

URGENT_LEVEL, BACKGROUND_LEVEL = 1, 2
ROOT = Path(__file__).resolve().parents[2]
MODEL_PY = Path(__file__).with_name("triton_model.py")

# Every tensor is numeric: texts travel as UTF-8 bytes in UINT8 rows padded with NULs ([items, longest], ragged
# across requests so the dynamic batcher still joins requests of different lengths). Triton 2.51's Python-backend
# stub was built against numpy 1 and reads numpy 2 arrays with the wrong item size (string tensors crash it, numeric
# ones come out wrong), so model.py moves tensors only through DLPack, and ragq's numpy 2 runs inside the stub.
_IO = {
    "embed": ([("TEXT", "TYPE_UINT8", [-1]), ("KIND", "TYPE_UINT8", [-1])], [("EMBEDDING", "TYPE_FP32", [-1])]),
    "rerank": ([("QUERY", "TYPE_UINT8", [-1]), ("DOCUMENT", "TYPE_UINT8", [-1])], [("SCORE", "TYPE_FP32", [1])]),
    "generate": ([("PROMPT", "TYPE_UINT8", [-1]), ("MAX_NEW_TOKENS", "TYPE_INT32", [1])],
                 [("TEXT", "TYPE_UINT8", [-1])]),
}


def encode_texts(texts: list[str]) -> np.ndarray:
    """UTF-8 rows padded with NULs: uint8 [len(texts), longest] (at least one column). Trailing NULs of a text are
    not kept (ragq's texts have none: Postgres refuses NUL in text)."""
    raw = [t.encode("utf-8") for t in texts]
    out = np.zeros((len(raw), max([1, *map(len, raw)])), dtype=np.uint8)
    for row, data in zip(out, raw):
        row[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def decode_texts(rows: np.ndarray) -> list[str]:
    """The texts of `encode_texts` rows."""
    rows = np.asarray(rows, dtype=np.uint8)
    return [row.tobytes().rstrip(b"\0").decode("utf-8") for row in rows.reshape(rows.shape[0], -1)]


def _tensors(kind: str, items: list[tuple[str, str, list[int]]]) -> str:
    def ragged(dtype: str) -> str:   # text inputs: requests of different lengths batch together
        return " allow_ragged_batch: true" if kind == "input" and dtype == "TYPE_UINT8" else ""

    return "\n".join(
        f'{kind} {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{ragged(dtype)} }}'
        for name, dtype, dims in items)


def model_config(spec: ModelSpec, device: str) -> str:
    """config.pbtxt for `spec` on `device` (cpu or cuda:N)."""
    inputs, outputs = _IO[spec.role]
    preferred = sorted({b for b in (spec.urgent_batch, spec.batch_size // 2, spec.batch_size) if 0 < b <= spec.batch_size})
    fields = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(spec).items() if k not in ("extra", "backend")}
    # the model's own settings (the generator's decode loop, thinking), not how this side reaches the server
    fields["extra"] = {k: v for k, v in spec.extra.items() if not k.startswith("triton")}
    kind, gpus = ("KIND_GPU", f" gpus: [ {int(device.split(':')[1])} ]") if device.startswith("cuda") else ("KIND_CPU", "")
    params = {"ragq_spec": json.dumps(fields)}
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items())
    delay_us = int(spec.max_queue_delay_ms * 1000)
    return f"""name: "{spec.name}"
backend: "python"
max_batch_size: {spec.batch_size}
{_tensors("input", inputs)}
{_tensors("output", outputs)}
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {delay_us}
  priority_levels: 2
  default_priority_level: {BACKGROUND_LEVEL}
}}
instance_group [ {{ count: 1 kind: {kind}{gpus} }} ]
{parameters}
"""


def write_model(repository: Path, spec: ModelSpec, device: str) -> Path:
    """Write (or refresh) `spec`'s entry in the model repository; returns its directory."""
    folder = repository / spec.name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(model_config(spec, device), encoding="utf-8")
    shutil.copyfile(MODEL_PY, version / "model.py")
    (version / "footprint.json").unlink(missing_ok=True)
    (version / "ragq_paths.json").write_text(json.dumps(python_paths()), encoding="utf-8")
    return folder


def python_paths() -> list[str]:
    """ragq's source tree and this environment's package folders, for the Python backend's stub (which sees only
    its own standard library): the server runs on this host, with the same Python minor version's stub."""
    import site
    import sysconfig

    first = [p for p in os.environ.get("RAGQ_TRITON_STUB_PATH", "").split(os.pathsep) if p]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]   # as Python orders them
    paths = [*first, str(ROOT), *extra, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *site.getsitepackages()]
    return list(dict.fromkeys(paths))


def _setting(spec: ModelSpec, key: str) -> str:
    """A Triton setting: `triton_<key>` in the model's table, else RAGQ_TRITON_<KEY>; "" when neither is set."""
    return str(spec.extra.get(f"triton_{key}") or os.environ.get(f"RAGQ_TRITON_{key.upper()}") or "")


def triton_endpoint(spec: ModelSpec) -> tuple[str, Path]:
    url, repository = _setting(spec, "url"), _setting(spec, "repository")
    if not url or not repository:
        raise BackendUnavailable(
            f"model {spec.name}: backend \"triton\" needs RAGQ_TRITON_URL and RAGQ_TRITON_REPOSITORY (or triton_url "
            "and triton_repository in its table)")
    return url, Path(repository)


def client_for(url: str) -> tuple[Any, Any]:
    """(client, the tritonclient module) for http://host:port or grpc://host:port."""
    if url.startswith("grpc://"):
        import tritonclient.grpc as module

        return module.InferenceServerClient(url.removeprefix("grpc://")), module
    import tritonclient.http as module

    return module.InferenceServerClient(url.removeprefix("http://"), network_timeout=600.0,
                                        connection_timeout=600.0), module


class TritonModel(ModelBase):
    """A model on a Triton server: `run` sends one inference request for the micro-batch (urgent at priority 1)."""

    takes_priority = True   # the engine marks urgent micro-batches (params["urgent"])

    def __init__(self, spec: ModelSpec, device: str, url: str, repository: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.device = device
        self.url = url
        self.repository = repository
        self.client, self.module = client_for(url)
        self.nbytes = 0
        self.load_ms = 0.0
        self.packed = False

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def load(self) -> None:
        write_model(self.repository, self.spec, self.device)
        t0 = time.perf_counter()
        try:
            self.client.load_model(self.name)
        except Exception as exc:  # tritonclient raises InferenceServerException with the server's reason
            raise ModelLoadFailed(f"model {self.name}: Triton could not load it: {exc}") from None
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        footprint = json.loads((self.repository / self.name / "1" / "footprint.json").read_text())
        self.nbytes = int(footprint["bytes"])
        self.packed = bool(footprint.get("packed"))

    def unload(self) -> None:
        try:
            self.client.unload_model(self.name)
        except Exception as exc:  # noqa: BLE001 - already gone, or the server is away: nothing is held here
            log.warning("Triton: unloading %s: %s", self.name, exc)
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:   # unloading finishes asynchronously on the server
            try:
                if not self.client.is_model_ready(self.name):
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(0.05)

    def sleep(self) -> None:
        """Triton keeps no host copy: the model is unloaded from the server."""
        self.unload()

    def wake(self, asynchronous: bool = False) -> None:
        self.load()
        return None

    # -- inference --------------------------------------------------------------------------------------------------
    def _input(self, name: str, values: np.ndarray, dtype: str) -> Any:
        tensor = self.module.InferInput(name, list(values.shape), dtype)
        tensor.set_data_from_numpy(values)
        return tensor

    def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
        if not items:
            return BatchOutput([])
        n = len(items)
        role = self.spec.role

        if role == "embed":
            texts = [str(getattr(item, "text", item)) for item in items]
            inputs = [self._input("TEXT", encode_texts(texts), "UINT8"),
                      self._input("KIND", encode_texts([str(params.get("kind") or "document")] * n), "UINT8")]
            wanted = "EMBEDDING"
        elif role == "rerank":
            inputs = [self._input("QUERY", encode_texts([str(q) for q, _ in items]), "UINT8"),
                      self._input("DOCUMENT", encode_texts([str(d) for _, d in items]), "UINT8")]
            wanted = "SCORE"
        else:
            tokens = int(params.get("max_new_tokens") or self.spec.max_new_tokens)
            inputs = [self._input("PROMPT", encode_texts([str(p) for p in items]), "UINT8"),
                      self._input("MAX_NEW_TOKENS", np.full((n, 1), tokens, dtype=np.int32), "INT32")]
            wanted = "TEXT"
        priority = URGENT_LEVEL if params.get("urgent") else BACKGROUND_LEVEL
        t0 = time.perf_counter()
        try:
            result = self.client.infer(self.name, inputs, outputs=[self.module.InferRequestedOutput(wanted)],
                                       priority=priority)
        except Exception as exc:
            raise BackendUnavailable(f"model {self.name}: Triton inference failed: {exc}") from None
        phases = {"launch": (time.perf_counter() - t0) * 1000.0}
        out = result.as_numpy(wanted)
        if role == "embed":
            outputs: list[Any] = [row.tolist() for row in out]
        elif role == "rerank":
            outputs = [float(v) for v in out.reshape(-1)]
        else:
            outputs = decode_texts(out)
        return BatchOutput(outputs, phases=phases)

    def count_tokens(self, items: list[Any]) -> list[int]:
        from workers.backends.tokens import count_tokens

        return count_tokens(self.spec, items)


def load_triton_model(spec: ModelSpec, device: str) -> TritonModel:
    url, repository = triton_endpoint(spec)
    model = TritonModel(spec, device, url, repository)
    model.load()
    return model


class TritonMetricsCollector:
    """Folds a Triton server's Prometheus metrics into ragq's exporter: every `nv_*` family, renamed
    `ragq_triton_*`, read from the server's /metrics at each scrape."""

    def __init__(self, metrics_url: str, timeout_s: float = 2.0) -> None:
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s

    def collect(self) -> Any:
        import urllib.request

        from prometheus_client.core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as response:  # noqa: S310
                body = response.read().decode("utf-8")
        except OSError as exc:
            log.debug("Triton metrics at %s: %s", self.metrics_url, exc)
            return
        for family in text_string_to_metric_families(body):
            if not family.name.startswith("nv_"):
                continue
            renamed = Metric("ragq_triton_" + family.name[3:], family.documentation, family.type)
            for sample in family.samples:
                renamed.add_sample("ragq_triton_" + sample.name[3:], sample.labels, sample.value,
                                   sample.timestamp, sample.exemplar)
            yield renamed


def metrics_url_for(spec: ModelSpec) -> str | None:
    """The metrics endpoint of the server `spec` uses: triton_metrics_url / RAGQ_TRITON_METRICS_URL, else port
    8002 of its server's host (Triton's default)."""
    explicit = _setting(spec, "metrics_url")
    if explicit:
        return explicit
    url = _setting(spec, "url")
    if not url:
        return None
    host = url.split("://", 1)[-1].rsplit(":", 1)[0]
    return f"http://{host}:8002/metrics"


def metrics_collectors(specs: dict[str, ModelSpec]) -> tuple[TritonMetricsCollector, ...]:
    """One collector per Triton server the worker's models use."""
    urls = {metrics_url_for(s) for s in specs.values() if s.backend == "triton"}
    return tuple(TritonMetricsCollector(url) for url in sorted(u for u in urls if u))


__all__ = ["TritonMetricsCollector", "TritonModel", "decode_texts", "encode_texts", "load_triton_model",
           "metrics_collectors", "model_config", "write_model"]
