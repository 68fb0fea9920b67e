"""Pure parts of the channels: Standard Webhooks signing, Retry-After, backoff, ids, redaction."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from herald.channels import apprise, email, sending, webhook
from herald.config import Settings


def test_signature_matches_the_standard_webhooks_reference_vector():
    # The vector published with the Standard Webhooks spec (its libraries' "sign function works" test).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = webhook.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": f"v1,bogus {signature}"}
    assert webhook.verify(secret, headers, b'{"test": 2432232314}', now=1614265330 + 10)
    assert not webhook.verify(secret, headers, b'{"test": 2432232315}', now=1614265330)
    assert not webhook.verify(secret, headers, b'{"test": 2432232314}', now=1614265330 + 3600)  # stale


def test_secrets_that_are_not_base64_are_refused():
    with pytest.raises(webhook.SecretError):
        webhook.secret_key("whsec_not base64!")
    with pytest.raises(webhook.SecretError):
        webhook.secret_key("whsec_")


def test_retry_after_as_seconds_or_http_date():
    assert webhook.retry_after_seconds("120") == 120.0
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert webhook.retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert webhook.retry_after_seconds("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert webhook.retry_after_seconds("soon") is None and webhook.retry_after_seconds(None) is None


def test_backoff_is_exponential_capped_jittered_and_honours_retry_after():
    settings = Settings(delivery_backoff_seconds=30, delivery_max_backoff_seconds=600)
    rng = random.Random(1)
    for attempts, base in ((1, 30), (2, 60), (3, 120), (5, 480), (6, 600), (20, 600)):
        delays = [sending.backoff_seconds(attempts, settings, rng=rng) for _ in range(200)]
        assert base / 2 <= min(delays) and max(delays) <= base, (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > base / 4  # jitter spreads the retries
    assert sending.backoff_seconds(1, settings, retry_after=900, rng=rng) == 900
    assert sending.backoff_seconds(1, settings, retry_after=10**9, rng=rng) == sending.MAX_RETRY_AFTER_SECONDS


def delivery(**kw) -> sending.Delivery:
    values = dict(id=42, notification_id=7, user_id=3, channel="email", address="a@example.test",
                  priority="normal", attempts=1, notification_type="price_drop", title="T", body="x < y\n\nz",
                  payload='{"a": 1}', trigger_id=9, created_at=datetime(2026, 1, 1, tzinfo=UTC), channel_enabled=True)
    return sending.Delivery(**(values | kw))


def test_idempotency_ids_are_derived_from_the_delivery():
    d = delivery()
    assert d.idempotency_id == "herald-delivery-42"
    assert email.message_id(d, "Shop <no-reply@shop.example>") == "<herald-delivery-42@shop.example>"
    assert email.message_id(d, None) == "<herald-delivery-42@herald.invalid>"
    assert email.html_body(d) == "<p>x &lt; y</p><p>z</p>"
    assert webhook.body_of(d) == webhook.body_of(delivery())  # the same bytes on every try
    assert webhook.host_conn_id("Hooks.Example-Shop.com") == "notifications_webhook_hooks_example_shop_com"


def test_apprise_reasons_lose_their_addresses():
    text = "Failed to send JSON notification to 127.0.0.1:8080: 500 - Internal Server Error."
    assert "127.0.0.1" not in apprise.redact(text) and "500" in apprise.redact(text)
    assert "hooks.slack.com" not in apprise.redact("bad url slack://T1/B2/C3 at https://hooks.slack.com/x")


def test_an_email_row_names_one_address_and_a_subject_has_one_line():
    assert email.single_address("user1@example.test") and email.single_address(" a.b+c@x.example ")
    for bad in ("a@x.test,b@y.test", "a@x.test; b@y.test", "nobody", "@x.test", "a@", "a@x.test\r\nBcc: b@y"):
        assert not email.single_address(bad), bad
    assert email.subject_of(delivery(title="Price\r\nBcc: evil@x.test  drop")) == "Price Bcc: evil@x.test drop"


def test_delivery_metrics_are_named_per_channel(monkeypatch):
    from herald import metrics

    calls: list[tuple[str, float]] = []

    class Recorder:
        def incr(self, name, count=1):
            calls.append((name, count))

        def timing(self, name, ms):
            calls.append((name, ms))

    monkeypatch.setattr(metrics, "_stats", Recorder)
    result = sending.DeliveryResult("run", 0, "webhook", "normal", sent=5, retried=2, failed=1, disabled=1,
                                    duration_seconds=0.5)
    metrics.deliveries_recorded(result)
    assert calls == [("herald.deliveries.sent.webhook", 5), ("herald.deliveries.retried.webhook", 2),
                     ("herald.deliveries.failed.webhook", 1), ("herald.deliveries.disabled.webhook", 1),
                     ("herald.deliveries.batch.duration", 500.0)]
