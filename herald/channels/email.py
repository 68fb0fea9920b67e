"""Email through the SMTP provider's hook (connection ``notifications_smtp``), many messages per connection.

One ``SmtpHook`` login per send task, opened at the first message, then one ``sendmail`` per delivery
on that connection. Every message carries ``Message-ID: <herald-delivery-<id>@<domain of from_email>>``,
the same on every try, so a mail system or a reader can recognise a retry.

Answers: a recipient or message refused with a 5xx code fails the delivery with that code (permanent);
a 4xx is retried. A server that cannot be reached, drops the connection or refuses the sender (the
connection's own settings are wrong) stops the task: its chunk is retried later and the rest of its
batch is released unsent, so an SMTP outage costs one connection attempt per run, and nothing is lost.

Connection extras (provider 3.x): ``from_email`` (required), ``disable_ssl`` / ``disable_tls``,
``timeout``, and ``retry_limit``: set it to 0, since herald retries each delivery itself (the hook would
otherwise resend a refused message on the same connection up to 5 times).
"""

from __future__ import annotations

import html
import logging
import smtplib
from typing import Any

from herald.channels.sending import Delivery, Outcome
from herald.config import SMTP_CONN_ID

log = logging.getLogger(__name__)

FALLBACK_DOMAIN = "herald.invalid"


def message_id(delivery: Delivery, from_email: str | None) -> str:
    """``<herald-delivery-42@example.com>``: stable across retries (RFC 5322 msg-id)."""
    domain = (from_email or "").rpartition("@")[2].strip(" >") or FALLBACK_DOMAIN
    return f"<{delivery.idempotency_id}@{domain}>"


def html_body(delivery: Delivery) -> str:
    """The body as HTML: the rendered text, escaped (payload text is data, never markup)."""
    paragraphs = (delivery.body or "").split("\n\n")
    return "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)


def single_address(address: str) -> bool:
    """One plain address: the hook splits ``to`` on commas and semicolons, so one row must not name two."""
    local, at, domain = address.strip().rpartition("@")
    return bool(local and at and domain) and not any(c in address for c in ",;\r\n<>")


def subject_of(delivery: Delivery) -> str:
    """The title on one line: a header never carries a line break (no header injection from payloads)."""
    return " ".join((delivery.title or "").split())[:998]


def _smtp_code(exc: smtplib.SMTPException) -> tuple[int | None, str]:
    """The SMTP reply code and text of a refusal, without the addresses it names."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code, text = next(iter(exc.recipients.values()))
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, text = exc.smtp_code, exc.smtp_error
    else:
        return None, type(exc).__name__
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return code, " ".join(str(text).split())[:200]


class EmailSender:
    """Sends emails on one SMTP connection of the provider's ``SmtpHook`` (opened at the first send)."""

    channel = "email"

    def __init__(self, conn_id: str = SMTP_CONN_ID, hook: Any = None) -> None:
        self.conn_id = conn_id
        self._hook = hook
        self._connected = False
        self.connections = 0  # logins made (the bench's "per SMTP connection")

    def __enter__(self) -> EmailSender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connected:
            self._connected = False
            try:
                self._hook.__exit__(None, None, None)  # closes the SMTP client
            except Exception as close_exc:  # the server may be gone already
                log.info("closing the SMTP connection: %s", type(close_exc).__name__)

    def _connect(self) -> Outcome | None:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        if self._hook is None:
            self._hook = SmtpHook(smtp_conn_id=self.conn_id)
        try:
            self._hook.get_conn()
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome("retry", f"SMTP connection failed: {type(exc).__name__}", stop=True)
        except Exception as exc:  # AirflowException: connection missing, cannot connect after retries
            return Outcome("retry", f"SMTP connection unusable: {type(exc).__name__}: {str(exc)[:200]}", stop=True)
        self._connected = True
        self.connections += 1
        return None

    def send(self, d: Delivery) -> Outcome:
        if not single_address(d.address):
            return Outcome("failed", "not a single email address")
        if not self._connected:
            failed = self._connect()
            if failed is not None:
                return failed
        mid = message_id(d, self._hook.from_email)
        try:
            self._hook.send_email_smtp(
                to=d.address.strip(), subject=subject_of(d), html_content=html_body(d),
                custom_headers={"Message-ID": mid, "X-Herald-Delivery": str(d.id)},
            )
        except smtplib.SMTPServerDisconnected as exc:
            self._connected = False
            return Outcome("retry", f"SMTP connection lost: {type(exc).__name__}", stop=True)
        except smtplib.SMTPSenderRefused as exc:
            code, text = _smtp_code(exc)
            return Outcome("retry", f"SMTP sender refused: {code} {text}", stop=True)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
            code, text = _smtp_code(exc)
            if code is not None and 500 <= code < 600:
                return Outcome("failed", f"SMTP {code} {text}")
            return Outcome("retry", f"SMTP {code} {text}")
        except (OSError, smtplib.SMTPException) as exc:
            self._connected = False
            return Outcome("retry", f"SMTP error: {type(exc).__name__}", stop=True)
        except Exception as exc:  # AirflowException: no from_email in the connection, ...
            return Outcome("retry", f"SMTP connection misconfigured: {str(exc)[:200]}", stop=True)
        return Outcome("sent", message_id=mid)
