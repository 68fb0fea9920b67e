"""Real receivers for the channel tests: an HTTP server that checks Standard Webhooks signatures.

:class:`WebhookReceiver` is a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port), started and stopped
by the test that uses it. It records every request and checks its signature with its own code, written
from the spec (not herald's ``sign``), so a test of herald's signing is not herald checking itself.
Per path, a script of answers (status, headers) is played in order, then 200.
The SMTP side is :class:`herald.channels.smtp_sink.SmtpSink` (``aiosmtpd``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from herald.processes import free_port

SECRET = "whsec_" + base64.b64encode(b"herald test secret, 32 bytes ok").decode()


def spec_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1: base64(HMAC-SHA256(base64decode(secret without whsec_), id.ts.body))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    return base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    signature_ok: bool
    at: float

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.port = free_port()
        self.requests: list[Request] = []
        self.scripts: dict[str, deque[tuple[int, dict[str, str]]]] = defaultdict(deque)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    script = receiver.scripts[self.path]
                    status, extra = script.popleft() if script else (200, {})
                    receiver.requests.append(Request(self.path, headers, body, status,
                                                     receiver._signature_ok(headers, body), time.time()))
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _signature_ok(self, headers: dict[str, str], body: bytes) -> bool:
        msg_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
        if not msg_id or not timestamp or abs(time.time() - int(timestamp)) > 300:
            return False
        expected = spec_signature(self.secret, msg_id, timestamp, body)
        return any(part == f"v1,{expected}" for part in headers.get("webhook-signature", "").split())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *answers: int | tuple[int, dict[str, str]]) -> None:
        """Answer the next requests to ``path`` with these statuses (then 200)."""
        for a in answers:
            self.scripts[path].append(a if isinstance(a, tuple) else (a, {}))

    def to(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
