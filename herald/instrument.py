"""Counting wrappers for PostgreSQL statements and Redis round trips (benchmark and tests).

They count what the client sends, so the figures hold on any server: no ``pg_stat_statements`` or
``INFO commandstats`` needed.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis


class StatementCounter:
    """Counts statements sent through every cursor of the connections it is attached to."""

    def __init__(self) -> None:
        self.statements = 0

    def connect(self, url: str, **kwargs: Any) -> psycopg.Connection:
        counter = self

        class CountingCursor(psycopg.Cursor):
            def execute(self, query, params=None, **kw):  # type: ignore[override]
                counter.statements += 1
                return super().execute(query, params, **kw)

            def executemany(self, query, params_seq, **kw):  # type: ignore[override]
                counter.statements += 1
                return super().executemany(query, params_seq, **kw)

            def copy(self, statement, params=None, **kw):  # type: ignore[override]
                counter.statements += 1
                return super().copy(statement, params, **kw)

        return psycopg.connect(url, cursor_factory=CountingCursor, **kwargs)


class CountingRedis(redis.Redis):
    """A redis-py client that counts round trips (a pipeline is one) and commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_trips = 0
        self.commands = 0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> CountingRedis:  # type: ignore[override]
        return super().from_url(url, **kwargs)  # type: ignore[return-value]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        self.commands += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        client = self
        execute = pipe.execute

        def counted_execute(raise_on_error: bool = True) -> Any:
            client.round_trips += 1
            client.commands += len(pipe.command_stack)
            return execute(raise_on_error)

        pipe.execute = counted_execute  # type: ignore[method-assign]
        return pipe
