"""Counting wrappers for PostgreSQL statements and Redis round trips (benchmark and tests).

They count what the client sends, so the figures hold on any server: no ``pg_stat_statements`` or
``INFO commandstats`` needed. :class:`SlowestRedisCall` is the exception: the server's own time per
command, which only the server knows (``SLOWLOG``).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
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


class SlowestRedisCall:
    """The longest server-side execution time of any command sent by clients named ``client_name``.

    Redis's ``SLOWLOG`` records a command's execution time (not the network or the queueing). While this
    context is open every command is logged (threshold 0, a long log); the previous settings come back on
    exit. The log is global to the server: run it on a Redis the benchmark has to itself.
    """

    SETTINGS = ("slowlog-log-slower-than", "slowlog-max-len")

    def __init__(self, url: str, client_name: str, max_len: int = 200_000) -> None:
        self.client_name = client_name
        self.max_len = max_len
        self.admin = redis.Redis.from_url(url)
        self.saved: dict[str, str] = {}
        self.max_ms: float | None = None  # None: the server does not allow SLOWLOG / CONFIG
        self.logged = 0  # commands of this client seen in the log
        self.overflowed = False  # the log wrapped: an early command may be missing

    def __enter__(self) -> SlowestRedisCall:
        try:
            for name in self.SETTINGS:
                self.saved.update(self.admin.config_get(name))
            self.admin.config_set("slowlog-max-len", self.max_len)
            self.admin.config_set("slowlog-log-slower-than", 0)
            self.admin.slowlog_reset()
        except redis.RedisError:  # a managed Redis may refuse CONFIG: no figure, nothing changed
            with contextlib.suppress(redis.RedisError):
                self._restore()
            self.saved = {}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.saved:  # CONFIG was refused on entry: nothing to read or restore
            self.admin.close()
            return
        try:
            entries = self.admin.slowlog_get(self.max_len)
            self.overflowed = self.admin.slowlog_len() >= self.max_len
            ours = [e["duration"] for e in entries if _text(e.get("client_name")) == self.client_name]
            self.logged = len(ours)
            self.max_ms = round(max(ours, default=0) / 1000, 3)
        finally:
            self._restore()
            self.admin.close()

    def _restore(self) -> None:
        for name, value in self.saved.items():
            self.admin.config_set(name, value)
        self.admin.slowlog_reset()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
