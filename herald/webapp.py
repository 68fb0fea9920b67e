"""The herald plugin's web app: the "Notifications" page and its JSON API, served by Airflow's API server.

Built by ``plugins/herald_plugin.py`` on the first request (never at import: every Airflow process
imports the plugins folder). Mounted under ``/herald``:

- ``GET /herald/``                   the page (``plugins/herald_web/``), refreshes itself;
- ``GET /herald/api/stats``          :func:`herald.stats.queue_stats` plus ``executor``
                                     (:func:`herald.queues.executor_queues`);
- ``GET /herald/api/failed?limit=N`` the latest failed triggers and their reasons (``1 <= N <= 500``);
- ``GET /herald/openapi.json``       this API's OpenAPI schema.

Every route, the schema included, requires an authenticated Airflow user, like the rest of the Airflow
API: a JWT in ``Authorization: Bearer ...`` or the UI's ``_token`` cookie. Airflow does not add that to
a plugin's app: the app declares it (``requires_authenticated``). Without credentials the answer is 401
(``Not authenticated``, or ``Token Expired``); with a token that does not verify, 403 (``Invalid JWT
token``). FastAPI's own ``/docs`` and ``/redoc`` stay off (they would load assets from a CDN).

Answers carry ids, types, counts, ages and reasons; never a payload or personal data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from herald import stats
from herald.config import POSTGRES_CONN_ID, Settings

log = logging.getLogger(__name__)

#: A page view must never hang on a slow database or Redis.
STATEMENT_TIMEOUT_MS = 10_000
REDIS_TIMEOUT_SECONDS = 2.0
SETTINGS_TTL_SECONDS = 60.0
NO_STORE = {"Cache-Control": "no-store"}


# --------------------------------------------------------------------------------- response schemas


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    detail: str


class Backlog(_Model):
    normal: int
    urgent: int
    total: int


class Ages(_Model):
    normal: float | None
    urgent: float | None


class Claims(_Model):
    held: int
    expired: int


class Window(_Model):
    triggers_processed: int
    triggers_done: int
    triggers_failed: int
    notifications_delivered: int
    digests_sent: int


class Throughput(_Model):
    last_hour: Window
    last_24h: Window


class Outcomes(_Model):
    delivered: int
    skipped_preference: int
    rate_limited: int
    digested: int
    failed: int


class Run(_Model):
    run_id: str
    mode: str | None
    dry_run: bool
    started_at: str | None
    finished_at: str | None
    running: bool
    duration_seconds: float | None
    triggers: int
    counts: dict[str, float]


class Cache(_Model):
    available: bool
    hits: int | None
    misses: int | None
    hit_ratio: float | None


class SeriesPoint(_Model):
    start: str | None
    runs: int
    triggers_processed: float | None
    delivered: float | None
    backlog: float | None


class Series(_Model):
    bucket_seconds: int
    points: list[SeriesPoint]


class ExecutorQueue(_Model):
    name: str
    waiting_in_broker: int | None
    workers: list[str]
    queued_task_instances: int
    oldest_queued_age_seconds: float | None


class Executor(_Model):
    executor: str
    has_queues: bool
    note: str | None
    broker_error: str | None
    queues: list[ExecutorQueue]


class UrgentLatency(_Model):
    triggers: int
    p50_seconds: float | None
    p95_seconds: float | None


class DeliveryWindow(_Model):
    pending: int
    sent: int
    failed: int
    disabled: int


class ChannelDeliveries(_Model):
    pending: int
    due: int
    retrying: int
    oldest_pending_age_seconds: float | None
    last_24h: DeliveryWindow


class DeliveryFailure(_Model):
    channel: str
    status: str
    reason: str | None
    count: int
    latest: str | None


class Deliveries(_Model):
    channels: dict[str, ChannelDeliveries]
    failures: list[DeliveryFailure]


class Stats(_Model):
    generated_at: str
    backlog: Backlog
    oldest_pending_age_seconds: Ages
    urgent_latency_last_hour: UrgentLatency
    claims: Claims
    throughput: Throughput
    outcomes_last_hour: Outcomes
    recent_runs: list[Run]
    cache: Cache
    series: Series
    deliveries: Deliveries
    executor: Executor | None


class FailedTrigger(_Model):
    id: int
    trigger_type: str
    priority: str
    created_at: str | None
    processed_at: str | None
    attempts: int | None
    run_id: str | None
    last_error: str | None


class Failed(_Model):
    limit: int
    triggers: list[FailedTrigger]


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "No credentials (`Not authenticated`) or an expired token "
                                               "(`Token Expired`): sign in (`POST /auth/token`) again"},
    403: {"model": ErrorDetail, "description": "The token does not verify (`Invalid JWT token`)"},
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "The notifications database is unreachable or not migrated"},
}


# -------------------------------------------------------------------------------------------- data


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


_settings_cache: tuple[float, Settings] | None = None


def _settings() -> Settings:
    """herald Settings with the cache namespace from the Airflow Variable ``herald_cache_namespace``.

    Variables are looked up the Airflow way (``AIRFLOW_VAR_*`` environment, secrets backend, metadata
    database), cached for a minute. Only the namespace matters to the stats.
    """
    global _settings_cache
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


def _executor() -> dict[str, Any] | None:
    from herald import queues

    try:
        return queues.executor_queues()
    except Exception:  # the metadata DB or the broker: the rest of the page still works
        log.exception("herald: executor queue statistics failed")
        return None


def page_html(web_dir: Path) -> str:
    """index.html with herald.css and herald.js inlined: one self-contained response."""
    html = (web_dir / "index.html").read_text()
    css = (web_dir / "herald.css").read_text()
    js = (web_dir / "herald.js").read_text()
    return html.replace("<!-- herald.css -->", f"<style>\n{css}</style>").replace(
        "<!-- herald.js -->", f"<script>\n{js}</script>"
    )


def _unavailable(what: str, exc: Exception) -> HTTPException:
    # The reason's type only: a driver message may carry the host or user of the connection.
    log.exception("herald: %s failed", what)
    if type(exc).__name__ == "UndefinedTable":
        return HTTPException(503, detail="notifications database has no herald tables: run `herald db migrate`")
    return HTTPException(503, detail=f"notifications database unavailable ({type(exc).__name__})")


# --------------------------------------------------------------------------------------------- app


def create_app(web_dir: Path) -> FastAPI:
    """The FastAPI app behind ``/herald``; every route requires an authenticated Airflow user."""
    from airflow.api_fastapi.core_api.security import requires_authenticated

    app = FastAPI(
        title="herald",
        summary="The notification queue of herald, inside Airflow's API server",
        version="1",
        dependencies=[Depends(requires_authenticated())],
        responses=AUTH_RESPONSES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the same login as every route
    )

    # Plain `def` routes: FastAPI runs them in its thread pool, so blocking DB calls stay off the loop.
    @app.get("/api/stats", response_model=None, responses={200: {"model": Stats}, **UNAVAILABLE},
             summary="The queue at a glance, and the executor's queues")
    def api_stats() -> JSONResponse:
        try:
            with _connections() as (conn, client):
                body = stats.queue_stats(conn, client, _settings())
        except Exception as exc:
            raise _unavailable("stats", exc) from None
        body["executor"] = _executor()
        return JSONResponse(body, headers=NO_STORE)

    @app.get("/api/failed", response_model=None, responses={200: {"model": Failed}, **UNAVAILABLE},
             summary="The latest failed triggers and their reasons (no payloads)")
    def api_failed(limit: int = Query(50, ge=1, le=stats.FAILED_LIMIT_MAX)) -> JSONResponse:
        try:
            with _connections(with_redis=False) as (conn, _client):
                rows = stats.failed_triggers(conn, limit)
        except Exception as exc:
            raise _unavailable("failed triggers", exc) from None
        return JSONResponse({"limit": limit, "triggers": rows}, headers=NO_STORE)

    @app.get("/", response_class=HTMLResponse, summary="The Notifications page")
    def page() -> HTMLResponse:
        return HTMLResponse(page_html(web_dir), headers=NO_STORE)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi(), headers=NO_STORE)

    return app
