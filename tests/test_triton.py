"""The Triton backend against a real tritonserver (from the nvidia-pytriton wheel, on the CPU): ragq writes the
model repository, loads each role through the repository API over HTTP and gRPC, infers, unloads and reloads;
the results equal the torch backend's. Triton's metrics fold into ragq's."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.triton_server import TritonServer
from workers.backends.loading import load_torch_model
from workers.backends.triton_backend import (
    TritonMetricsCollector,
    TritonModel,
    decode_texts,
    encode_texts,
    load_triton_model,
    model_config,
)
from workers.models import ModelSpec

pytestmark = pytest.mark.integration

TEXTS = ["hello there", "a much longer text about redis and postgres and the GPU worker", "yes"]
PAIRS = [("what is redis", "Redis is the broker; the result backend answers the synchronous call."), ("x", "yes")]
PROMPTS = ["Question: what", "The GPU worker loads the embedder then the reranker and"]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    saved = {k: os.environ.get(k) for k in ("RAGQ_TRITON_STUB_PATH", "RAGQ_TRITON_REPOSITORY", "RAGQ_TRITON_URL")}
    os.environ.pop("RAGQ_TRITON_STUB_PATH", None)   # the stub runs with this environment's own numpy (2.x)
    server = TritonServer(root / "repository", root / "tritonserver.log").start()
    os.environ["RAGQ_TRITON_REPOSITORY"] = str(server.repository)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def specs(tiny_models: dict[str, Path]) -> dict[str, ModelSpec]:
    return {
        "embed": ModelSpec(role="embed", path=tiny_models["embed"], name="tri-embed", kind="last", dim=32,
                           batch_size=16),
        "rerank": ModelSpec(role="rerank", path=tiny_models["lm"], name="tri-rerank", batch_size=16),
        "generate": ModelSpec(role="generate", path=tiny_models["lm"], name="tri-generate", max_new_tokens=8,
                              batch_size=4),
    }


CASES = {"embed": (TEXTS, {"kind": "query"}), "rerank": (PAIRS, {}), "generate": (PROMPTS, {"max_new_tokens": 6})}


def close(a: object, b: object) -> None:
    if isinstance(a, list):
        assert a == pytest.approx(b, abs=1e-4)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    else:
        assert a == b


@pytest.mark.parametrize("role", ["embed", "rerank", "generate"])
def test_each_role_loads_infers_unloads_and_reloads_over_http(triton, tiny_models, role) -> None:  # type: ignore[no-untyped-def]
    spec = specs(tiny_models)[role]
    items, params = CASES[role]
    torch_model = load_torch_model(spec, "cpu")
    expected = torch_model.run(list(items), dict(params))
    model = load_triton_model(dataclasses.replace(spec, backend="triton", extra={"triton_url": triton.http_url}), "cpu")
    assert model.client.is_model_ready(spec.name)
    assert model.nbytes == torch_model.nbytes and model.load_ms > 0   # measured in the server, as the torch backend does
    for got, want in zip(model.run(list(items), dict(params)), expected):
        close(got, want)
    model.sleep()   # Triton keeps no host copy: the model leaves the server
    assert not model.client.is_model_ready(spec.name)
    model.wake()
    assert model.client.is_model_ready(spec.name)
    for got, want in zip(model.run(list(items), dict(params)), expected):
        close(got, want)
    model.unload()
    assert not model.client.is_model_ready(spec.name)


def test_grpc_and_the_metrics_fold_into_ragqs(triton, tiny_models) -> None:  # type: ignore[no-untyped-def]
    spec = dataclasses.replace(specs(tiny_models)["embed"], backend="triton", name="tri-embed-grpc",
                               extra={"triton_url": triton.grpc_url})
    expected = load_torch_model(spec, "cpu").run(TEXTS, {"kind": "document"})
    model = load_triton_model(spec, "cpu")
    for got, want in zip(model.run(TEXTS, {"kind": "document"}), expected):
        assert got == pytest.approx(want, abs=1e-4)
    def counted() -> bool:
        families = {f.name: f for f in TritonMetricsCollector(triton.metrics_url).collect()}
        success = families["ragq_triton_inference_request_success"]
        return any(s.labels.get("model") == "tri-embed-grpc" and s.value >= 1 for s in success.samples)

    # the server records a request's statistics as it finishes it, which may be after the reply reached us: a few
    # scrapes (the CI run on a busy machine once scraped before the count was there)
    assert any(counted() or time.sleep(0.5) for _ in range(20))
    model.unload()


def test_a_model_triton_cannot_load_fails_with_its_reason(triton, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.errors import ModelLoadFailed

    spec = ModelSpec(role="embed", path=tmp_path / "missing", name="tri-missing", backend="triton",
                     extra={"triton_url": triton.http_url})
    with pytest.raises(ModelLoadFailed, match="tri-missing"):
        load_triton_model(spec, "cpu")


def test_the_model_config_asks_for_dynamic_batching_with_priorities() -> None:
    spec = ModelSpec(role="embed", path=Path("/m"), name="cfg", batch_size=64, urgent_batch=8,
                     max_queue_delay_ms=2.5)
    config = model_config(spec, "cuda:1")
    for line in ('backend: "python"', "max_batch_size: 64", "preferred_batch_size: [ 8, 32, 64 ]",
                 "max_queue_delay_microseconds: 2500", "priority_levels: 2", "default_priority_level: 2",
                 "kind: KIND_GPU gpus: [ 1 ]",
                 'name: "TEXT" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true',
                 'output { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ -1 ] }'):
        assert line in config
    assert "KIND_CPU" in model_config(spec, "cpu")


def test_texts_travel_as_utf8_rows() -> None:
    texts = ["", "héllo wörld — ünïcode ✓", "a", "x" * 300]
    rows = encode_texts(texts)
    assert rows.dtype.name == "uint8" and rows.shape == (4, 300)
    assert decode_texts(rows) == texts
    assert encode_texts([""]).shape == (1, 1) and decode_texts(encode_texts([""])) == [""]


def test_the_dynamic_batcher_joins_concurrent_requests_of_different_lengths(triton, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """Texts are ragged across requests, so requests of different lengths still share one execution."""
    from concurrent.futures import ThreadPoolExecutor

    spec = dataclasses.replace(specs(tiny_models)["embed"], backend="triton", name="tri-batcher",
                               max_queue_delay_ms=500.0, extra={"triton_url": triton.http_url})
    texts = [("word " * (i * 7 + 1)).strip() for i in range(6)]
    expected = load_torch_model(spec, "cpu").run(texts, {"kind": "document"})
    model = load_triton_model(spec, "cpu")
    clients = [TritonModel(spec, "cpu", triton.http_url, triton.repository)
               for _ in texts]   # one connection per caller, as separate workers' requests arrive
    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(lambda i: clients[i].run([texts[i]], {"kind": "document"})[0], range(len(texts))))
    for g, want in zip(got, expected):
        assert g == pytest.approx(want, abs=1e-4)
    stats = model.client.get_inference_statistics(spec.name)["model_stats"][0]
    assert int(stats["inference_count"]) == len(texts)
    assert int(stats["execution_count"]) < len(texts)   # joined, though each request's rows had its own length
    model.unload()


def test_an_urgent_request_overtakes_queued_background_ones(triton, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """Urgent micro-batches go at priority 1: with the instance busy and background requests queued, the urgent one
    queued last runs next."""
    import threading
    import time

    spec = dataclasses.replace(specs(tiny_models)["generate"], backend="triton", name="tri-priority", batch_size=1,
                               urgent_batch=1, max_queue_delay_ms=0.0, extra={"triton_url": triton.http_url})
    model = load_triton_model(spec, "cpu")
    finished: dict[str, float] = {}

    def send(name: str, tokens: int, urgent: bool) -> None:
        client = TritonModel(spec, "cpu", triton.http_url, triton.repository)   # one connection per caller
        client.run([f"{name}: the GPU worker"], {"max_new_tokens": tokens, "urgent": urgent})
        finished[name] = time.monotonic()

    background = [f"bg{i}" for i in range(1, 6)]
    calls = [("running", 400, False), *((name, 200, False) for name in background), ("urgent", 4, True)]
    threads = []
    for name, tokens, urgent in calls:   # the first occupies the one instance; the rest queue in this order
        threads.append(threading.Thread(target=send, args=(name, tokens, urgent)))
        threads[-1].start()
        time.sleep(0.2 if name == "running" else 0.02)
    for thread in threads:
        thread.join(120)
    assert set(finished) == {name for name, _, _ in calls}
    # first come, first served would finish it last; at priority 1 it runs once the request in progress (the
    # first, or by then one of the first background ones) is done, ahead of the rest of the queue
    overtaken = sum(finished["urgent"] < finished[name] for name in background)
    assert overtaken >= 3, finished
    model.unload()


def test_the_stub_finds_packages_in_the_order_python_does(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The stub sees neither PYTHONPATH nor site-packages: ragq_paths.json gives them, stub folders first."""
    import sysconfig

    from workers.backends.triton_backend import ROOT, python_paths

    stub, extra = tmp_path / "stub", tmp_path / "extra"
    monkeypatch.setenv("RAGQ_TRITON_STUB_PATH", str(stub))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(extra), ""]))
    paths = python_paths()
    assert paths[:3] == [str(stub), str(ROOT), str(extra)]
    assert paths.index(str(extra)) < paths.index(sysconfig.get_paths()["purelib"])
    assert "" not in paths


def test_the_engines_residency_drives_the_triton_repository(triton, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """ragq's engine with Triton models under a budget that holds one of them at a time: each swap is an unload
    and a load on the server (recorded as model events), and the answers are the torch backend's."""
    from workers.backends import load_model
    from workers.engine import Engine
    from workers.observer import EventLog

    base = specs(tiny_models)
    chosen = {role: dataclasses.replace(base[role], backend="triton", name=f"eng-{role}",
                                        extra={"triton_url": triton.http_url}) for role in ("embed", "generate")}
    # transformers' generate: the tiny generator's KV cache would outweigh its weights and blur the one-at-a-time
    # budget this test is about (the decode loop has tests of its own)
    chosen["generate"].extra["decode"] = "off"
    size = max(load_torch_model(s, "cpu").nbytes for s in chosen.values())
    events: list[dict[str, object]] = []
    engine = Engine("cpu", chosen, load_model, int(size * 1.5), host_budget_bytes=0,
                    observer=EventLog(events)).start()
    try:
        import tritonclient.http as http

        client = http.InferenceServerClient(triton.http_url.removeprefix("http://"))
        expected_vec = load_torch_model(base["embed"], "cpu").run(TEXTS, {"kind": "query"})
        expected_text = load_torch_model(base["generate"], "cpu").run(PROMPTS, {"max_new_tokens": 6})
        for _ in range(2):
            vectors = engine.run("embed", TEXTS, params={"kind": "query"}).outputs
            assert client.is_model_ready("eng-embed") and not client.is_model_ready("eng-generate")
            texts = engine.run("generate", PROMPTS, params={"max_new_tokens": 6}).outputs
            assert client.is_model_ready("eng-generate") and not client.is_model_ready("eng-embed")
            for got, want in zip(vectors, expected_vec):
                assert got == pytest.approx(want, abs=1e-4)
            assert texts == expected_text
        loads = [e for e in events if e.get("event") == "load"]
        assert [e["model"] for e in loads] == ["eng-embed", "eng-generate", "eng-embed", "eng-generate"]
        assert all(float(e["ms"]) > 0 and int(e["bytes"]) > 0 for e in loads)
    finally:
        engine.stop()
