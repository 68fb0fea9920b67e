"""A local SMTP sink (``aiosmtpd``, in a thread of this process) that keeps what it receives.

Used by ``herald bench`` (the delivery figure: messages per second per SMTP connection) and by the
tests (what the SMTP server saw). It binds 127.0.0.1 on a free port; ``aiosmtpd``'s Controller cannot
take port 0, so a free port is picked first (:func:`herald.processes.free_port`). Stop it with
:meth:`SmtpSink.stop` (or use it as a context manager). It can be started again on the same port, which
is how the tests take an SMTP server down for a while.
"""

from __future__ import annotations

import email
import email.policy
import logging
import threading
from dataclasses import dataclass
from typing import Any

from herald.processes import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    subject: str | None
    delivery_id: str | None  # the X-Herald-Delivery header
    size: int


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        if self.sink.keep_messages:
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            received = Received(envelope.mail_from, tuple(envelope.rcpt_tos), message.get("Message-ID"),
                                message.get("Subject"), message.get("X-Herald-Delivery"), len(envelope.content))
        else:
            received = None
        with self.sink.lock:
            self.sink.count += 1
            if received is not None:
                self.sink.messages.append(received)
        return "250 Message accepted for delivery"

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,  # noqa: N802
                          responses: list[str]) -> list[str]:
        with self.sink.lock:
            self.sink.sessions += 1
        session.host_name = hostname
        return responses


class SmtpSink:
    """An in-process SMTP server on 127.0.0.1 that accepts and records every message."""

    def __init__(self, port: int | None = None, *, keep_messages: bool = True) -> None:
        self.port = port or free_port()
        self.keep_messages = keep_messages
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.count = 0
        self.sessions = 0  # EHLOs: one per SMTP connection that logged in
        self._controller: Any = None

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        # aiosmtpd logs every command at INFO, recipients' addresses included: keep them out of logs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def connection_uri(self, from_email: str = "herald <notifications@example.test>") -> str:
        """The ``notifications_smtp`` connection for this sink, as JSON for ``AIRFLOW_CONN_*``."""
        import json

        return json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": self.port,
            "extra": {"from_email": from_email, "disable_ssl": True, "disable_tls": True, "retry_limit": 0,
                      "timeout": 10},
        })

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
