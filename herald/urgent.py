"""The urgent lane's wake-up: an event trigger that starts ``notification_urgent`` seconds after an INSERT.

It runs in Airflow's triggerer, behind an ``AssetWatcher`` (``dags/notification_urgent.py``). It
LISTENs on ``herald_urgent`` (a statement trigger of migration 0006 NOTIFYs there at the commit of any
INSERT of urgent triggers) and also looks at the table every ``poll_seconds``, so a notification lost
while it was being re-armed (the triggerer recreates it after each event) or while it was
disconnected only delays a trigger by a poll. It fires when urgent triggers are waiting that the lane
was not woken for (``urgent_lane_due.sql`` records each wake-up atomically), never merely because
some are still pending while a woken run is about to claim them: that is what keeps empty runs rare.

A signal, never the truth: the urgent DAG claims from ``notification_triggers`` like every run, with
``SKIP LOCKED``, and the two-minute ``notification_batch`` takes whatever the lane did not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from herald.config import POSTGRES_CONN_ID, SQL_DIR

log = logging.getLogger(__name__)

CHANNEL = "herald_urgent"
POLL_SECONDS = 2.0
#: Urgent triggers still claimable this long after the lane's last wake-up wake it again (the run it
#: woke died, or never came): long enough for a woken run to start and claim under load.
STALE_SECONDS = 30.0


class UrgentTriggersWaiting(BaseEventTrigger):
    """Fires once when urgent triggers wait that the lane was not woken for (see the module doc)."""

    def __init__(self, conn_id: str = POSTGRES_CONN_ID, poll_seconds: float = POLL_SECONDS,
                 stale_seconds: float = STALE_SECONDS) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.poll_seconds = poll_seconds
        self.stale_seconds = stale_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"conn_id": self.conn_id, "poll_seconds": self.poll_seconds, "stale_seconds": self.stale_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg

        due_sql = (SQL_DIR / "urgent_lane_due.sql").read_text()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(**await self._conninfo(),
                                                                 autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")  # a constant channel name
                    while True:
                        cur = await conn.execute(due_sql, {"stale_seconds": self.stale_seconds})
                        waiting, woken = await cur.fetchone()
                        if woken is not None:
                            log.info("%s urgent trigger(s) waiting (through id %s): waking the urgent lane",
                                     waiting, woken)
                            yield TriggerEvent({"waiting": waiting, "through_trigger_id": woken})
                            return
                        async for _ in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                            break
            except psycopg.OperationalError as exc:  # the database restarted: listen again shortly
                log.warning("urgent lane listener lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(self.poll_seconds)

    async def _conninfo(self) -> dict[str, Any]:
        from airflow.sdk import BaseHook

        conn = await BaseHook.aget_connection(self.conn_id)
        params = {"host": conn.host, "port": conn.port, "user": conn.login, "password": conn.password,
                  "dbname": conn.schema, "application_name": "herald-urgent-lane"}
        extra = conn.extra_dejson
        for key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "options"):
            if key in extra:
                params[key] = extra[key]
        return {k: v for k, v in params.items() if v not in (None, "")}
