"""Names shared by the DAGs, the plugin, the CLI and ``airflow_settings.yaml``, and the tuning settings.

Every connection id, pool name and Variable name lives here once; ``airflow_settings.yaml`` mirrors
them and ``tests/dag_validation`` checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DAG_ID = "notification_batch"
HOUSEKEEPING_DAG_ID = "notification_housekeeping"
URGENT_DAG_ID = "notification_urgent"
#: The asset whose watcher (herald.urgent) wakes the urgent lane.
URGENT_ASSET = "herald_urgent_triggers"
DELIVERY_DAG_ID = "notification_delivery"

POSTGRES_CONN_ID = "notifications_db"
REDIS_CONN_ID = "notifications_redis"
#: Email deliveries go through this SMTP connection (conn_type ``smtp``; extras ``from_email`` ...).
SMTP_CONN_ID = "notifications_smtp"
#: Webhook signing secret (``whsec_...``) in this connection's password; an endpoint's own secret may
#: live in ``notifications_webhook_<host>`` (see ``herald.channels.webhook``).
WEBHOOK_CONN_ID = "notifications_webhook"

POOL_NORMAL = "notifications"
POOL_URGENT = "urgent_notifications"
QUEUE_URGENT = "urgent"

#: The channels herald delivers to beyond the inbox, each with the Airflow pool of its send tasks, so a
#: slow SMTP server holds back only email. Urgent deliveries of every channel go through POOL_URGENT.
CHANNELS = ("email", "webhook", "apprise")
POOL_EMAIL = "email_deliveries"
POOL_WEBHOOK = "webhook_deliveries"
POOL_APPRISE = "apprise_deliveries"
CHANNEL_POOLS = {"email": POOL_EMAIL, "webhook": POOL_WEBHOOK, "apprise": POOL_APPRISE}

#: The project root (``herald`` is installed editable from it) and its SQL folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = Path(os.environ.get("HERALD_SQL_DIR", PROJECT_ROOT / "include" / "sql"))

#: Prefix of every metric the pipeline emits (``herald.notifications.delivered`` ...).
METRICS_PREFIX = "herald"


#: Bounds of each numeric setting, checked whenever settings are made: nonsense is refused with a
#: message naming the Variable instead of surfacing later as a stuck or empty run.
#: ``max_batches_per_run`` stays within Airflow's ``[core] max_map_length`` (1024 by default).
BOUNDS: dict[str, tuple[int, int]] = {
    "rate_limit": (1, 1_000_000),
    "rate_window_seconds": (1, 31 * 24 * 3600),
    "batch_size": (1, 10_000_000),
    "max_triggers_per_run": (1, 10_000_000),
    "max_batches_per_run": (1, 1024),
    "claim_lease_seconds": (1, 7 * 24 * 3600),
    "max_attempts": (1, 1000),
    "preferences_ttl_seconds": (1, 7 * 24 * 3600),
    "favorites_ttl_seconds": (1, 7 * 24 * 3600),
    "retention_days": (1, 3650),
    "delivery_max_attempts": (1, 100),
    "delivery_backoff_seconds": (1, 24 * 3600),
    "delivery_max_backoff_seconds": (1, 7 * 24 * 3600),
    "delivery_timeout_seconds": (1, 300),
    "delivery_batch_size": (1, 1_000_000),
    "delivery_max_per_run": (1, 10_000_000),
    "delivery_claim_lease_seconds": (1, 7 * 24 * 3600),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Tuning knobs. Each field is an Airflow Variable ``herald_<field>`` (see ``airflow_settings.yaml``)."""

    #: Normal notifications a user may receive in any sliding window (digests included).
    rate_limit: int = 20
    rate_window_seconds: int = 3600
    #: Upper bound of recipients (estimated at claim time) in one mapped batch.
    batch_size: int = 50_000
    #: Upper bound of triggers one DAG run claims; the next run takes the rest. 200,000 lets a burst of
    #: 100x W1 (100,000 triggers, about 5 million recipients: some 100 batches) go in one run.
    max_triggers_per_run: int = 200_000
    #: Upper bound of mapped batches per run, kept well under ``[core] max_map_length`` (1024).
    max_batches_per_run: int = 256
    #: How long a claim holds before another run may take the trigger over. A batch renews the lease
    #: of its triggers when it starts and holds their rows locked while it works, so the lease only
    #: has to cover the wait between the claim and the batch's start (the pool queue).
    claim_lease_seconds: int = 900
    #: A trigger whose processing was started this many times without finishing is failed ("poison").
    max_attempts: int = 5
    preferences_ttl_seconds: int = 300
    favorites_ttl_seconds: int = 180
    #: Redis key prefix; the version part changes whenever the cached value format does.
    cache_namespace: str = "herald:v1"
    #: Outcome and run records older than this are removed by housekeeping (held ones never are).
    retention_days: int = 30
    #: Channel deliveries (``notification_delivery``): sends of one delivery before it ends ``failed``
    #: with its last error; the wait before try n+1 is ``backoff * 2**(n-1)`` capped at ``max_backoff``,
    #: times a random factor in [0.5, 1] (jitter), and never less than a receiver's ``Retry-After``.
    delivery_max_attempts: int = 8
    delivery_backoff_seconds: int = 30
    delivery_max_backoff_seconds: int = 3600
    #: Per webhook request (connect and read) and per SMTP connection.
    delivery_timeout_seconds: int = 10
    #: Deliveries per mapped send task (one SMTP connection, one HTTP session each) and per run.
    delivery_batch_size: int = 5_000
    delivery_max_per_run: int = 50_000
    #: How long a run's claim on deliveries holds before another run may take them over: it covers the
    #: wait for a pool slot; a send task renews it for each chunk it sends and holds the chunk's rows.
    delivery_claim_lease_seconds: int = 600

    def __post_init__(self) -> None:
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"Variable {self.variable_name(name)}={value!r}: must be an integer "
                                 f"from {low:,} to {high:,}")
        namespace = self.cache_namespace
        if not namespace or any(c.isspace() for c in namespace) or len(namespace) > 100:
            raise ValueError(f"Variable {self.variable_name('cache_namespace')}={namespace!r}: must be a "
                             "non-empty Redis key prefix without spaces, at most 100 characters")

    @classmethod
    def variable_name(cls, field: str) -> str:
        return f"herald_{field}"

    @classmethod
    def from_lookup(cls, lookup: Callable[[str], Any | None]) -> Settings:
        """Build settings from a ``name -> value or None`` lookup (Airflow Variables, environment)."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = lookup(cls.variable_name(field.name))
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = _cast(field, raw)
            except ValueError as exc:
                raise ValueError(f"Variable {cls.variable_name(field.name)}={raw!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``AIRFLOW_VAR_HERALD_*`` / ``HERALD_*`` environment variables (CLI, tests)."""
        env = os.environ if environ is None else environ

        def lookup(name: str) -> str | None:
            return env.get(f"AIRFLOW_VAR_{name.upper()}") or env.get(name.upper())

        return cls.from_lookup(lookup)

    @classmethod
    def from_airflow(cls) -> Settings:
        """Settings from Airflow Variables; call inside a task, never at DAG parse time."""
        from airflow.sdk import Variable

        return cls.from_lookup(lambda name: Variable.get(name, default=None))


def _cast(field: dataclasses.Field, raw: Any) -> Any:
    kind = {"int": int, "str": str}[field.type if isinstance(field.type, str) else field.type.__name__]
    if kind is int:
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ValueError("not an integer") from None
    return str(raw)


def defaults() -> dict[str, Any]:
    """Default settings as ``{variable_name: value}``, the shape of ``airflow_settings.yaml``."""
    return {Settings.variable_name(f.name): f.default for f in dataclasses.fields(Settings)}
