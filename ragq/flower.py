"""`ragq flower`: Flower on ragq's broker, never without authentication, optionally read-only.

Basic auth (RAGQ_FLOWER_USER and RAGQ_FLOWER_PASSWORD) or OAuth (RAGQ_FLOWER_AUTH, a regex of the e-mail addresses
let in, with Flower's own FLOWER_AUTH_PROVIDER / FLOWER_OAUTH2_* variables); with neither, it refuses to start. The
credentials go to Flower inside this process (never on a command line, where `ps` shows them to everyone). Flower
listens on loopback unless RAGQ_FLOWER_ADDRESS says otherwise.

Read-only (`--read-only`): Flower's views and its read API stay; every endpoint that changes something — shut a
worker down, resize or restart its pool, add or cancel consumers, revoke, abort, apply or send tasks, set time or
rate limits — answers 403.
"""

from __future__ import annotations

from typing import Any

from ragq.core.errors import ConfigError
from ragq.core.services import ensure_services
from ragq.core.settings import Settings
from workers.celery_app import configure_app

# Flower's endpoints that act on workers or tasks (flower/urls.py, Flower 2.x)
MUTATING = (
    r"/api/worker/shutdown/", r"/api/worker/pool/", r"/api/worker/queue/", r"/api/task/apply/",
    r"/api/task/async-apply/", r"/api/task/send-task/", r"/api/task/abort/", r"/api/task/timeout/",
    r"/api/task/rate-limit/", r"/api/task/revoke/",
)


def auth_arguments(settings: Settings) -> list[str]:
    """Flower's authentication options from ragq's settings; a ConfigError when there is none."""
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if settings.flower_user or password:
        if not (settings.flower_user and password):
            raise ConfigError("RAGQ_FLOWER_USER and RAGQ_FLOWER_PASSWORD go together: set both for basic auth")
        if ":" in settings.flower_user or "," in settings.flower_user:
            raise ConfigError("RAGQ_FLOWER_USER may not contain ':' or ','")
        return [f"--basic-auth={settings.flower_user}:{password}"]
    if settings.flower_auth:
        return [f"--auth={settings.flower_auth}"]
    raise ConfigError("Flower runs only with authentication: set RAGQ_FLOWER_USER and RAGQ_FLOWER_PASSWORD "
                      "(basic auth), or RAGQ_FLOWER_AUTH (OAuth, see `ragq flower --help`)")


def make_read_only() -> int:
    """Swap Flower's mutating handlers for one that answers 403; returns how many were swapped."""
    import tornado.web
    from flower.urls import handlers
    from flower.views import BaseHandler

    class ReadOnly(BaseHandler):  # type: ignore[misc]
        def prepare(self) -> None:
            if not self.current_user:   # authentication first: a stranger gets 401, not a hint
                raise tornado.web.HTTPError(401)
            self.set_status(403)
            self.finish({"error": "this Flower is read-only (ragq flower --read-only)"})

        def check_xsrf_cookie(self) -> None:  # refused anyway: no form token needed to be told so
            return None

    swapped = 0
    for index, handler in enumerate(handlers):
        pattern = handler[0] if isinstance(handler, tuple) else getattr(handler, "regex", None)
        pattern = pattern if isinstance(pattern, str) else getattr(pattern, "pattern", "")
        if any(pattern.startswith(prefix) for prefix in MUTATING):
            handlers[index] = (pattern, ReadOnly)
            swapped += 1
    return swapped


def run(settings: Settings, *, read_only: bool, extra: list[str] | None = None) -> Any:
    auth = auth_arguments(settings)   # before anything starts
    endpoints = ensure_services(settings)
    app = configure_app(settings, endpoints)
    if read_only:
        make_read_only()
    argv = ["flower", f"--address={settings.flower_address}", f"--port={settings.flower_port}", *auth,
            *(extra or [])]
    return app.start(argv=argv)
