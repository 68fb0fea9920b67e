"""The "Notifications" view of the Airflow UI, and its JSON endpoints, served by the Airflow API server.

Mounted under ``/herald`` by ``airflow api-server`` (``fastapi_apps``), with a nav entry that shows
``/herald/`` inside the UI (``external_views``):

- ``GET /herald/``                  the page: backlog, ages, claims, throughput, outcomes, cache, runs,
                                    failed triggers, and a chart of the last 24 hours; refreshes itself.
- ``GET /herald/api/stats``         ``herald.stats.queue_stats`` as JSON.
- ``GET /herald/api/failed?limit=N`` the latest failed triggers and their reasons (``1 <= N <= 500``).

Every route requires an authenticated Airflow user, like the rest of the Airflow API: a JWT in
``Authorization: Bearer ...`` or the UI's ``_token`` cookie (which the page, opened from the UI, sends
by itself). Airflow does not add that to a plugin's app: the app declares it (``requires_authenticated``).
FastAPI's own ``/docs`` and ``/openapi.json`` are switched off, since they would not be covered.

This module is imported by *every* Airflow process that loads plugins (scheduler, dag-processor, each
task's process for its macros), not only by the API server. So it imports nothing but ``AirflowPlugin``
and the standard library, and connects to nothing: the FastAPI app (and the API server's security
module, ``herald.stats``, the provider hooks) is built on the first request, in the API server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/herald"
WEB_DIR = Path(__file__).resolve().parent / "herald_web"
#: Same connection id as herald.config (not imported at module level: see the module docstring).
POSTGRES_CONN_ID = "notifications_db"
#: A page view must never hang on a slow database or Redis.
STATEMENT_TIMEOUT_MS = 10_000
REDIS_TIMEOUT_SECONDS = 2.0
SETTINGS_TTL_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------- data


@contextmanager
def _connections(with_redis: bool = True) -> Iterator[tuple[Any, Any | None]]:
    """A connection to ``notifications_db`` and a Redis client (or None), closed at the end.

    Opened per request: the page asks every 15 s, and a connect costs a few milliseconds.
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(
        postgres_conn_id=POSTGRES_CONN_ID, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
    ).get_conn()
    client = None
    try:
        client = _redis_client() if with_redis else None
        yield conn, client
    finally:
        conn.close()
        if client is not None:
            client.close()


def _redis_client() -> Any | None:
    """The ``notifications_redis`` client with short timeouts, or None (stats then show no cache ratio)."""
    from herald.airflow_tasks import redis_from_hook

    return redis_from_hook(REDIS_TIMEOUT_SECONDS)


_settings_cache: tuple[float, Any] | None = None


def _settings() -> Any:
    """herald Settings with the cache namespace from the Airflow Variable ``herald_cache_namespace``.

    Variables are looked up the Airflow way (``AIRFLOW_VAR_*`` environment, secrets backend, metadata
    database), cached for a minute. Only the namespace matters to the stats.
    """
    global _settings_cache
    from herald.config import Settings

    now = time.monotonic()
    if _settings_cache and now - _settings_cache[0] < SETTINGS_TTL_SECONDS:
        return _settings_cache[1]
    wanted = Settings.variable_name("cache_namespace")

    def lookup(name: str) -> Any | None:
        if name != wanted:
            return None
        try:
            from airflow.sdk import Variable

            value = Variable.get(name, default=None)
        except Exception as exc:
            log.warning("herald: cannot read Variable %s: %s", name, exc)
            value = None
        return value or os.environ.get(name.upper())

    settings = Settings.from_lookup(lookup)
    _settings_cache = (now, settings)
    return settings


def _page() -> str:
    """index.html with herald.css and herald.js inlined: one self-contained response."""
    html = (WEB_DIR / "index.html").read_text()
    css = (WEB_DIR / "herald.css").read_text()
    js = (WEB_DIR / "herald.js").read_text()
    return html.replace("<!-- herald.css -->", f"<style>\n{css}</style>").replace(
        "<!-- herald.js -->", f"<script>\n{js}</script>"
    )


# ----------------------------------------------------------------------------------------------- app


def create_app() -> Any:
    """The FastAPI app behind ``/herald``; every route requires an authenticated Airflow user."""
    from airflow.api_fastapi.core_api.security import requires_authenticated
    from fastapi import Depends, FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse, JSONResponse

    from herald import stats

    app = FastAPI(
        title="herald",
        dependencies=[Depends(requires_authenticated())],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    no_store = {"Cache-Control": "no-store"}

    def unavailable(what: str, exc: Exception) -> HTTPException:
        # The reason's type only: a driver message may carry the host or user of the connection.
        log.exception("herald: %s failed", what)
        if type(exc).__name__ == "UndefinedTable":
            return HTTPException(
                503, detail="notifications database has no herald tables: run `herald db migrate`"
            )
        return HTTPException(503, detail=f"notifications database unavailable ({type(exc).__name__})")

    # Plain `def` routes: FastAPI runs them in its thread pool, so blocking DB calls stay off the loop.
    @app.get("/api/stats")
    def api_stats() -> JSONResponse:
        try:
            with _connections() as (conn, client):
                body = stats.queue_stats(conn, client, _settings())
        except Exception as exc:
            raise unavailable("stats", exc) from None
        return JSONResponse(body, headers=no_store)

    @app.get("/api/failed")
    def api_failed(limit: int = Query(50, ge=1, le=stats.FAILED_LIMIT_MAX)) -> JSONResponse:
        try:
            with _connections(with_redis=False) as (conn, _client):
                rows = stats.failed_triggers(conn, limit)
        except Exception as exc:
            raise unavailable("failed triggers", exc) from None
        return JSONResponse({"limit": limit, "triggers": rows}, headers=no_store)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers=no_store)

    return app


class HeraldApp:
    """The ASGI app mounted at ``/herald``: builds :func:`create_app` on the first request.

    See the module docstring for why the FastAPI app is not built at import time.
    """

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app()
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.get()(scope, receive, send)


app = HeraldApp()

_BELL = (
    "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24' fill='none' stroke='{color}' "
    "stroke-width='2' stroke-linecap='round' stroke-linejoin='round'><path d='M6 8a6 6 0 0 1 12 0c0 7 3 9 3 "
    "9H3s3-2 3-9'/><path d='M10.3 21a1.94 1.94 0 0 0 3.4 0'/></svg>"
)


def _icon(color: str) -> str:
    from urllib.parse import quote

    return "data:image/svg+xml," + quote(_BELL.format(color=color))


class HeraldPlugin(AirflowPlugin):
    name = "herald"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "herald"}]
    external_views = [
        {
            "name": "Notifications",
            "href": f"{URL_PREFIX}/",
            "url_route": "herald",
            "destination": "nav",
            "nav_top_level": True,
            # orange: readable on the light nav, the dark nav and the selected (navy) item alike
            "icon": _icon("#dd6b20"),
            "icon_dark_mode": _icon("#f6ad55"),
        }
    ]
