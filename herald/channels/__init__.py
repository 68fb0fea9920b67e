"""Channels beyond the inbox: email, signed webhooks and Apprise targets, through an outbox.

The batch that writes a notification writes its deliveries in the same statement
(``include/sql/insert_notifications.sql``), one row of ``notification_deliveries`` per notification x
channel x address. The ``notification_delivery`` DAG then:

1. **claims** due deliveries (``claiming.claim``): pending, due, urgent first, ``FOR UPDATE SKIP
   LOCKED`` with a lease, cut into batches by priority and channel;
2. **sends** each batch in a mapped task (``sending.deliver_batch``) through the channel's sender
   (``email.EmailSender``, ``webhook.WebhookSender``, ``apprise.AppriseSender``), chunk by chunk: count
   the attempt (committed), lock the chunk's rows, send, record every answer, commit;
3. **finalizes**: releases what it claimed and did not send.

Delivery outside the database is **at least once**: a send whose recording was lost (the process
killed between the two) is sent again by the retry, with the same idempotency id (``webhook-id``,
``Message-ID``: both derived from the delivery's id), so the receiver can deduplicate. Each delivery is
*recorded* exactly once: ``sent``, ``failed`` with its last error, or ``disabled``.
"""

from __future__ import annotations

from herald.channels.claiming import DeliveryBatch, claim, release
from herald.channels.sending import Delivery, DeliveryResult, Outcome, deliver_batch, idempotency_id

__all__ = [
    "Delivery",
    "DeliveryBatch",
    "DeliveryResult",
    "Outcome",
    "claim",
    "deliver_batch",
    "idempotency_id",
    "release",
]
