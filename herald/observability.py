"""Error tracking (Sentry) and metrics (StatsD) through Airflow's own integrations, one variable each.

- ``SENTRY_DSN=https://<key>@<host>/<project>`` switches on Airflow's Sentry integration (``[sentry]``,
  the ``sentry-sdk`` package): every task failure is reported with the task's identity (Airflow tags the
  event with ``dag_id``, ``task_id``, ``try_number``, the run's logical date and interval) and, as herald
  sets it, **without** local variables (a batch's locals hold trigger rows, payloads and recipients),
  breadcrumbs (log lines, SQL statements, Redis commands) or default PII.
- ``HERALD_STATSD=host:port`` switches on ``[metrics] statsd_on`` towards that StatsD server: Airflow's
  own metrics and herald's ``herald.*`` (see :mod:`herald.metrics`), all under ``[metrics] statsd_prefix``
  (``airflow`` unless set).

:func:`airflow_environment` turns those two variables into Airflow's; ``herald up`` adds the result to
every process it starts. An explicit ``AIRFLOW__SENTRY__*`` / ``AIRFLOW__METRICS__*`` variable wins.
"""

from __future__ import annotations

from collections.abc import Mapping

from herald.services.urls import host_port

SENTRY_ENV = "SENTRY_DSN"
STATSD_ENV = "HERALD_STATSD"
STATSD_DEFAULT = ("127.0.0.1", 8125)


def airflow_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Airflow's settings for Sentry and StatsD from ``SENTRY_DSN`` / ``HERALD_STATSD`` in ``environ``."""
    out: dict[str, str] = {}
    dsn = environ.get(SENTRY_ENV, "").strip()
    if dsn:
        out.update({
            "AIRFLOW__SENTRY__SENTRY_ON": "True",
            "AIRFLOW__SENTRY__SENTRY_DSN": dsn,
            # Keyword arguments of sentry_sdk.init, passed through by Airflow.
            "AIRFLOW__SENTRY__INCLUDE_LOCAL_VARIABLES": "False",
            "AIRFLOW__SENTRY__MAX_BREADCRUMBS": "0",
            "AIRFLOW__SENTRY__SEND_DEFAULT_PII": "False",
        })
    statsd = environ.get(STATSD_ENV, "").strip()
    if statsd:
        host, port = host_port(statsd, STATSD_DEFAULT)
        out.update({
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": host,
            "AIRFLOW__METRICS__STATSD_PORT": str(port),
        })
    return {k: environ.get(k, v) for k, v in out.items()}
