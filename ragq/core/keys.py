"""Collections and document keys. A collection is a named space of documents (questions search one); a key names
a document within its collection — by default the source as given, normalised: an absolute path, or a
DoclingDocument's origin URI or file name — so that ingesting the same source again replaces its old version."""

from __future__ import annotations

import os
import re
from typing import Any

from ragq.core.errors import BadInput

DEFAULT_COLLECTION = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_collection(name: str | None) -> str:
    """The collection's name, or BadInput naming the problem (letters, digits, '.', '_', '-', at most 128)."""
    value = DEFAULT_COLLECTION if name is None else str(name).strip()
    if not _NAME.match(value):
        raise BadInput("--collection", f"{name!r} is not a collection name: use letters, digits, '.', '_' and '-' "
                                       "(at most 128, starting with a letter or digit)")
    return value


def path_key(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def docling_key(document: Any) -> str:
    """A DoclingDocument's key: its origin's URI, else its origin's file name, else its name."""
    origin = getattr(document, "origin", None)
    for value in (getattr(origin, "uri", None), getattr(origin, "filename", None)):
        if value:
            return str(value)
    return f"docling:{document.name}"


def check_key(key: Any) -> str:
    value = str(key).strip() if key is not None else ""
    if not value or len(value) > 4096:
        raise BadInput("key", f"{key!r} is not a document key: give a non-empty text of at most 4096 characters")
    return value
