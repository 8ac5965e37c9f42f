"""What the `ragq` commands share: the consoles, exit codes, logging set-up, settings, and the guard that turns
ragq's errors into one line and an exit code."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ragq.core.errors import BadInput, ConfigError, QuestionTimeout, RagqError, ServiceError
from ragq.core.settings import Settings, load_settings

# piped or redirected output is not cut to 80 columns (rich's default without a terminal)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
JSON_HELP = "print JSON instead of text"


EXIT_FAILED_INPUT = 1
EXIT_USAGE = 2
EXIT_SERVICE = 3


def _setup_logging(level: str = "WARNING") -> None:
    """Rich on a terminal; one plain line per record (time, level, process, logger) when stderr goes to a file,
    journald or a container log, so that logs are not wrapped at 80 columns and grep finds whole records."""
    if err.is_terminal:
        from rich.logging import RichHandler

        logging.basicConfig(
            level=level, format="%(name)s: %(message)s", datefmt="[%X]",
            handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)], force=True,
        )
    else:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
            stream=sys.stderr, force=True,
        )
    for noisy in ("pgserver", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _error_line(message: str) -> None:
    # escaped: messages name things like "[embed]" or a file "notes[1].md", which rich would take for markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> NoReturn:
    _error_line(message)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _guard(func: Any) -> Any:
    """Turn ragq's errors into a clear message and an exit code."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BadInput as exc:
            _fail(str(exc), EXIT_USAGE)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        except ServiceError as exc:
            _fail(str(exc), EXIT_SERVICE)
        except QuestionTimeout as exc:
            _fail(str(exc), EXIT_FAILED_INPUT)
        except RagqError as exc:
            _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED_INPUT)

    return wrapper


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
