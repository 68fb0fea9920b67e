"""The executor's queues: what waits in the broker, which workers consume each queue, how long work waits.

Read inside the Airflow API server (the herald plugin, ``GET /herald/api/stats`` under ``executor``):

- the executor comes from Airflow's configuration (``[core] executor``);
- under the CeleryExecutor, for each of herald's queues (``urgent`` and ``default``): the messages
  waiting in the broker (not yet taken by any worker), the workers consuming the queue (a Celery
  remote-control broadcast, ``inspect().active_queues()``), and from the metadata database the task
  instances Airflow has queued there and the age of the oldest one. ``urgent`` with waiting work and no
  worker is the failure this page exists to show;
- under any other executor (the LocalExecutor of ``airflow standalone``) tasks have no queues:
  ``has_queues`` is false and ``note`` says why, instead of zeros that would look like an idle queue.

Shape (ages in seconds, ``null`` when nothing waits)::

    {"executor": "CeleryExecutor", "has_queues": true, "note": null, "broker_error": null,
     "queues": [{"name": "urgent", "waiting_in_broker": 0, "workers": ["urgent@host"],
                 "queued_task_instances": 0, "oldest_queued_age_seconds": null}, ...]}

The broadcast waits ``INSPECT_TIMEOUT_SECONDS`` for replies, so results are kept ``CACHE_SECONDS``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from herald.config import QUEUE_URGENT

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "default"
QUEUES = (QUEUE_URGENT, DEFAULT_QUEUE)
INSPECT_TIMEOUT_SECONDS = 1.0
CACHE_SECONDS = 5.0
NO_QUEUES_NOTE = ("{executor} runs every task on the scheduler's machine and ignores task queues: "
                  "there is no broker and no urgent worker. Run `herald up --executor celery` for them.")

_cache_lock = threading.Lock()
_cache: tuple[float, dict[str, Any]] | None = None


def executor_names(value: str) -> list[str]:
    """``[core] executor`` as class names: ``"LocalExecutor,my.module.CeleryExecutor"`` -> both short names."""
    names = []
    for item in value.split(","):
        item = item.strip()
        if item:
            names.append(item.split(":")[-1].rsplit(".", 1)[-1])
    return names


def _seconds_since(when: dt.datetime | None, now: dt.datetime) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(max(0.0, (now - when).total_seconds()), 3)


def queued_task_instances(queues: Iterable[str]) -> dict[str, tuple[int, dt.datetime | None]]:
    """Per queue: task instances in state ``queued`` and the oldest one's ``queued_dttm`` (metadata DB)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    queues = list(queues)
    stmt = (
        select(TaskInstance.queue, func.count(), func.min(TaskInstance.queued_dttm))
        .where(TaskInstance.state == "queued", TaskInstance.queue.in_(queues))
        .group_by(TaskInstance.queue)
    )
    with create_session() as session:
        rows = session.execute(stmt).all()
    found = {queue: (int(count), oldest) for queue, count, oldest in rows}
    return {q: found.get(q, (0, None)) for q in queues}


def _celery_app() -> Any:
    from airflow.providers.celery.executors.celery_executor_utils import app

    return app


def broker_waiting(app: Any, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in the broker per queue (Redis: the queue's lists, priority levels included)."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        size = getattr(channel, "_size", None)
        if size is not None:  # kombu's Redis transport: LLEN over the queue's priority lists
            return {q: int(size(q)) for q in queues}
        out = {}
        for q in queues:  # other transports: a passive declare reports the message count
            try:
                out[q] = int(channel.queue_declare(q, passive=True).message_count)
            except Exception:  # the queue was never declared: nothing waits in it
                out[q] = 0
        return out


def consumers(app: Any, queues: Sequence[str]) -> dict[str, list[str]]:
    """Workers consuming each queue, from their answers to a remote-control broadcast."""
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS).active_queues() or {}
    out: dict[str, list[str]] = {q: [] for q in queues}
    for worker, consumed in sorted(replies.items()):
        for queue in consumed or []:
            name = queue.get("name") if isinstance(queue, dict) else None
            if name in out:
                out[name].append(worker)
    return out


def executor_queues(executor: str | None = None, *, use_cache: bool = True) -> dict[str, Any]:
    """The executor block of ``/herald/api/stats`` (shape in the module docstring)."""
    global _cache
    now = time.monotonic()
    if use_cache and _cache and now - _cache[0] < CACHE_SECONDS and executor is None:
        return _cache[1]
    if executor is None:
        from airflow.configuration import conf

        executor = conf.get("core", "executor")
    names = executor_names(executor)
    result: dict[str, Any] = {"executor": ",".join(names), "has_queues": False, "note": None,
                              "broker_error": None, "queues": []}
    if "CeleryExecutor" not in names:
        result["note"] = NO_QUEUES_NOTE.format(executor=names[0] if names else "this executor")
        return result
    result["has_queues"] = True
    wall = dt.datetime.now(dt.UTC)
    queued = queued_task_instances(QUEUES)
    waiting: dict[str, int | None] = dict.fromkeys(QUEUES)
    workers: dict[str, list[str]] = {q: [] for q in QUEUES}
    try:
        app = _celery_app()
        waiting = dict(broker_waiting(app, QUEUES))
        workers = consumers(app, QUEUES)
    except Exception as exc:  # the broker is down: say so, never break the page
        log.warning("herald: broker unavailable for queue statistics: %s", type(exc).__name__)
        result["broker_error"] = type(exc).__name__
    result["queues"] = [
        {
            "name": q,
            "waiting_in_broker": waiting.get(q),
            "workers": workers.get(q, []),
            "queued_task_instances": queued[q][0],
            "oldest_queued_age_seconds": _seconds_since(queued[q][1], wall),
        }
        for q in QUEUES
    ]
    with _cache_lock:
        _cache = (time.monotonic(), result)
    return result
