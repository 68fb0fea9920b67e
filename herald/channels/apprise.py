"""Any Apprise target (Slack, Telegram, ntfy, Discord, Teams, a JSON endpoint ...) by its Apprise URL.

Through ``apprise.Apprise`` directly, checking its result: the provider's ``AppriseHook.notify()``
discards it, so a failed send would look like a success. A URL Apprise cannot parse fails the delivery
(permanent); a send Apprise reports as failed is retried. Apprise cannot tell which failures are
permanent, so those end ``failed`` after ``delivery_max_attempts``. Apprise's own log lines name the
target's host, so they are kept out of the task log; the failure reason herald records has its
addresses removed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from herald.channels.sending import Delivery, Outcome

log = logging.getLogger(__name__)

_ADDRESSY = re.compile(r"\S+://\S+|\bto \S+?:(?=\s)|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _quiet_apprise() -> Iterator[_Capture]:
    """Apprise's warnings and errors, captured instead of logged (they name hosts and URLs)."""
    logger = logging.getLogger("apprise")
    capture = _Capture()
    propagate = logger.propagate
    logger.propagate = False
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate


def redact(text: str) -> str:
    """An Apprise message without the URLs, hosts and addresses it names."""
    return " ".join(_ADDRESSY.sub("…", text).split())[:200]


class AppriseSender:
    """One ``apprise.Apprise`` per target URL (kept for the task), checking each ``notify()`` result."""

    channel = "apprise"

    def __init__(self) -> None:
        self._targets: dict[str, Any] = {}

    def __enter__(self) -> AppriseSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self._targets.clear()

    def _target(self, url: str) -> Any | None:
        import apprise

        if url not in self._targets:
            target = apprise.Apprise()
            with _quiet_apprise():
                self._targets[url] = target if target.add(url) else None
        return self._targets[url]

    def send(self, d: Delivery) -> Outcome:
        target = self._target(d.address)
        if target is None:
            return Outcome("failed", "not a valid Apprise URL")
        with _quiet_apprise() as capture:
            ok = target.notify(title=d.title or "", body=d.body or "")
        if ok:
            return Outcome("sent")
        detail = redact(capture.messages[-1]) if capture.messages else "no detail"
        return Outcome("retry", f"Apprise notify() failed: {detail}")
