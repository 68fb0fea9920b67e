"""Webhooks, signed the Standard Webhooks way (https://www.standardwebhooks.com/).

Each delivery is a JSON POST with three headers:

- ``webhook-id``: :func:`herald.channels.idempotency_id` of the delivery, the same on every try;
- ``webhook-timestamp``: the try's time, in integer seconds since the epoch;
- ``webhook-signature``: ``v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``, where the key
  is the base64-decoded part of the ``whsec_...`` secret after its prefix.

The secret is the password of the Airflow connection ``notifications_webhook``, or of
``notifications_webhook_<host>`` when that exists for the endpoint's host (dots and dashes as
underscores: ``notifications_webhook_hooks_example_com``); never from the database.

Answers, as the spec says: 2xx is success; 410 Gone disables the endpoint (the delivery ends
``disabled`` and the user's channel row is switched off); 429 and 5xx are retried, honouring
``Retry-After``; any other status fails the delivery with it; a timeout or a connection error is
retried. Redirects are not followed (a 3xx fails). After three transport errors in a row for one host,
the task stops calling that host and its other deliveries wait for a later try, so one dead endpoint
cannot hold a task for thousands of timeouts. One HTTP client (connection pool) per task.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from herald.channels.sending import Delivery, Outcome
from herald.config import WEBHOOK_CONN_ID

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
#: Consecutive transport errors (timeouts, refused connections) after which a host is skipped.
HOST_FAILURES_BEFORE_SKIP = 3
USER_AGENT = "herald-webhooks/1"

#: ``conn_id -> secret or None``; the default reads Airflow connections.
SecretLookup = Callable[[str], "str | None"]


class SecretError(ValueError):
    """The signing secret is missing or not a ``whsec_`` base64 secret."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional, as in the reference libraries)."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("the webhook secret is not base64 after its whsec_ prefix") from None
    if not key:
        raise SecretError("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance_seconds: int = 300,
           now: float | None = None) -> bool:
    """Whether a received webhook is authentic and fresh (what a receiver does; used by the tests)."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, signatures = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get(
        "webhook-signature", "")
    if not msg_id or not timestamp or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_seconds:
        return False
    expected = sign(secret, msg_id, int(timestamp), body).split(",", 1)[1]
    return any(part.startswith("v1,") and hmac.compare_digest(part[3:], expected) for part in signatures.split())


def body_of(d: Delivery) -> bytes:
    """The JSON body: the same bytes on every try (only the timestamp header and the signature change)."""
    payload: Any = None
    if d.payload:
        try:
            payload = json.loads(d.payload)
        except ValueError:
            payload = None
    document = {
        "type": f"notification.{d.notification_type}",
        "timestamp": d.created_at.isoformat() if d.created_at else None,
        "data": {
            "delivery_id": d.id,
            "notification_id": d.notification_id,
            "trigger_id": d.trigger_id,
            "user_id": d.user_id,
            "notification_type": d.notification_type,
            "priority": d.priority,
            "title": d.title,
            "body": d.body,
            "payload": payload,
        },
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _airflow_secret(conn_id: str) -> str | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id).password or None
    except AirflowNotFoundException:
        return None


def host_conn_id(host: str) -> str:
    """The per-endpoint connection id of a host: ``notifications_webhook_hooks_example_com``."""
    return f"{WEBHOOK_CONN_ID}_{re.sub(r'[^a-z0-9]+', '_', host.lower()).strip('_')}"


class WebhookSender:
    """POSTs signed webhooks through one ``httpx.Client`` (one connection pool) per task."""

    channel = "webhook"

    def __init__(self, timeout_seconds: float, secrets: SecretLookup | None = None,
                 client: httpx.Client | None = None) -> None:
        self.timeout_seconds = timeout_seconds
        self._lookup = secrets or _airflow_secret
        self._secrets: dict[str, str | None] = {}
        self._client = client
        self._own_client = client is None
        self._host_failures: dict[str, int] = {}

    def __enter__(self) -> WebhookSender:
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_seconds, follow_redirects=False,
                                        headers={"user-agent": USER_AGENT})
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def _secret(self, host: str) -> str | None:
        """The endpoint's own secret (cached per host), else the shared one."""
        if host not in self._secrets:
            self._secrets[host] = self._lookup(host_conn_id(host)) or self._shared()
        return self._secrets[host]

    def _shared(self) -> str | None:
        if "" not in self._secrets:
            self._secrets[""] = self._lookup(WEBHOOK_CONN_ID)
        return self._secrets[""]

    def send(self, d: Delivery) -> Outcome:
        assert self._client is not None, "use WebhookSender as a context manager"
        parts = urlsplit(d.address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Outcome("failed", "not an http(s) URL")
        host = parts.hostname
        if self._host_failures.get(host, 0) >= HOST_FAILURES_BEFORE_SKIP:
            return Outcome("retry", "endpoint unreachable: skipped after repeated transport errors in this task")
        secret = self._secret(host)
        if not secret:
            return Outcome("retry", f"no webhook signing secret: set the password of connection {WEBHOOK_CONN_ID}")
        body = body_of(d)
        timestamp = int(time.time())
        try:
            signature = sign(secret, d.idempotency_id, timestamp, body)
        except SecretError as exc:
            return Outcome("retry", f"webhook secret unusable: {exc}")
        headers = {
            "content-type": "application/json",
            "webhook-id": d.idempotency_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        try:
            response = self._client.post(d.address, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            self._host_failures[host] = self._host_failures.get(host, 0) + 1
            return Outcome("retry", f"timeout: {type(exc).__name__} after {self.timeout_seconds:g} s")
        except httpx.TransportError as exc:
            self._host_failures[host] = self._host_failures.get(host, 0) + 1
            return Outcome("retry", f"transport error: {type(exc).__name__}")
        self._host_failures[host] = 0
        code = response.status_code
        if 200 <= code < 300:
            return Outcome("sent", message_id=d.idempotency_id)
        reason = f"HTTP {code} {response.reason_phrase}".strip()
        if code == 410:
            return Outcome("disabled", f"{reason}: endpoint disabled", disable_channel=True)
        if code == 429 or code >= 500:
            return Outcome("retry", reason, retry_after=retry_after_seconds(response.headers.get("retry-after")))
        return Outcome("failed", reason)
