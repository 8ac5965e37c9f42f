"""The Triton Python-backend model that ragq writes into the model repository (as `<model>/1/model.py`).

It runs the same torch code as ragq's torch backend (workers/backends/torch_backend.py): the model's spec comes from
the `ragq_spec` parameter of config.pbtxt; ragq's source tree and its environment's packages from ragq_paths.json. One `execute` call gets every
request that Triton's dynamic batcher put together and runs them as one micro-batch per set of parameters (the
embedding kind, the generation length). After loading it writes `footprint.json` next to itself: the weights'
bytes and the load time, which ragq's engine reads as it reads the torch backend's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# the stub's interpreter knows only its own standard library: ragq wrote where its environment's packages and its
# source tree are (ragq_paths.json, beside this file), needed before numpy and Triton's utilities are imported
for _path in reversed(json.loads(Path(__file__).with_name("ragq_paths.json").read_text(encoding="utf-8"))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402 - provided by Triton's Python backend

from workers.backends.triton_backend import decode_texts, encode_texts  # noqa: E402


def _array(tensor: Any) -> np.ndarray:
    """An input tensor's values through DLPack: the stub's own numpy conversion (as_numpy) assumes numpy 1."""
    return np.from_dlpack(tensor)


def _output(name: str, values: np.ndarray) -> Any:
    """An output tensor through DLPack, from a torch tensor: the stub renames a consumed capsule "used_dlpack",
    which numpy's capsule destructor reports as an error on every response and torch's ignores."""
    import torch

    return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(values)))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        from workers.backends.loading import load_torch_model
        from workers.models import ModelSpec

        spec_fields = json.loads(params["ragq_spec"])
        spec_fields["path"] = Path(spec_fields["path"])
        spec_fields["stop"] = tuple(spec_fields.get("stop") or ())
        self.spec = ModelSpec(**{**spec_fields, "backend": "torch"})
        kind = args.get("model_instance_kind", "CPU")
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if kind == "GPU" else "cpu"
        t0 = time.perf_counter()
        self.model = load_torch_model(self.spec, device)
        load_ms = (time.perf_counter() - t0) * 1000.0
        footprint = Path(args["model_repository"]) / args["model_version"] / "footprint.json"
        footprint.write_text(json.dumps({"bytes": int(self.model.nbytes), "load_ms": load_ms, "device": device,
                                         "pid": os.getpid(), "packed": bool(getattr(self.model, "packed", False))}))

    def _inputs(self, request: Any) -> tuple[list[Any], tuple[tuple[str, Any], ...]]:
        def texts(name: str) -> list[str]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return [] if tensor is None else decode_texts(_array(tensor))

        role = self.spec.role
        if role == "embed":
            kinds = texts("KIND")
            return texts("TEXT"), (("kind", kinds[0] if kinds else "document"),)
        if role == "rerank":
            return [[q, d] for q, d in zip(texts("QUERY"), texts("DOCUMENT"))], ()
        tokens = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        count = int(_array(tokens).reshape(-1)[0]) if tokens is not None else 0
        return texts("PROMPT"), (("max_new_tokens", count),)

    def _response(self, outputs: list[Any]) -> Any:
        role = self.spec.role
        if role == "embed":
            tensor = _output("EMBEDDING", np.asarray(outputs, dtype=np.float32))
        elif role == "rerank":
            tensor = _output("SCORE", np.asarray(outputs, dtype=np.float32).reshape(-1, 1))
        else:
            tensor = _output("TEXT", encode_texts(outputs))
        return pb_utils.InferenceResponse(output_tensors=[tensor])

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed = [self._inputs(r) for r in requests]
        groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
        for index, (_, params) in enumerate(parsed):
            groups.setdefault(params, []).append(index)
        responses: list[Any] = [None] * len(requests)
        for params, indices in groups.items():
            items = [item for i in indices for item in parsed[i][0]]
            options = {k: v for k, v in params if v}
            try:
                outputs = self.model.run(items, options)
            except Exception as exc:  # noqa: BLE001 - every request of the group gets the error
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
                continue
            start = 0
            for i in indices:
                n = len(parsed[i][0])
                responses[i] = self._response(outputs[start:start + n])
                start += n
        return responses

    def finalize(self) -> None:
        self.model.unload()
