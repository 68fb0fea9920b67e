"""Connection URLs: libpq / redis-py URLs, Airflow connection URIs, SQLAlchemy URLs, and redaction.

One place converts between the forms herald meets:

- ``postgresql://`` URLs (or libpq ``key=value`` strings) for psycopg and ``DATABASE_URL``;
- ``redis://`` URLs for redis-py and ``REDIS_URL``;
- Airflow connections given as environment variables (``AIRFLOW_CONN_*``, URI or JSON form), read the
  way Airflow reads them, and written so that Airflow's hooks land on the same servers;
- SQLAlchemy URLs (``postgresql+psycopg://``) for Airflow's metadata database and Celery's result backend.

Nothing here opens a connection.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from herald.config import POSTGRES_CONN_ID, REDIS_CONN_ID

if TYPE_CHECKING:
    from herald.services.discovery import Services

log = logging.getLogger(__name__)

PG_CONN_ENV = f"AIRFLOW_CONN_{POSTGRES_CONN_ID.upper()}"
REDIS_CONN_ENV = f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}"

#: Extras of an Airflow postgres connection that are libpq parameters (the rest are Airflow's own).
_LIBPQ_EXTRAS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "connect_timeout",
        "application_name",
        "options",
        "target_session_attrs",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "gssencmode",
        "channel_binding",
    }
)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (URL or libpq ``key=value`` form)."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def pg_url(params: Mapping[str, Any]) -> str:
    """A ``postgresql://`` URL from libpq parameters (``key=value`` conninfo for multi-host ones)."""
    params = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    host = params.pop("host", "")
    port = params.pop("port", "")
    if "," in host or "," in port:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=host, port=port, **params)
    user = params.pop("user", "")
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    if host.startswith("/"):  # a Unix socket directory goes in the query string
        params = {"host": host, **params}
        host = ""
    elif ":" in host:  # IPv6
        host = f"[{host}]"
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@" if auth else "") + host + (f":{port}" if port else "")
    query = ("?" + urlencode(params)) if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def with_database(url: str, name: str) -> str:
    """``url`` (URL or conninfo) pointing at database ``name`` on the same server."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    params["dbname"] = name
    return pg_url(params)


def redis_url(host: str, port: int, db: int = 0, *, username: str | None = None,
              password: str | None = None, ssl: bool = False) -> str:
    auth = quote(username or "", safe="")
    if password:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host) + f":{port}"
    return f"{'rediss' if ssl else 'redis'}://{netloc}/{db}"


def host_port(value: str, default: tuple[str, int]) -> tuple[str, int]:
    """``host:port``, ``host`` or ``port`` (the missing part from ``default``)."""
    value = value.strip()
    if value.isdigit():
        return default[0], int(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or host.count(":") and not host.startswith("["):
        return value.strip("[]"), default[1]
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------------
# Airflow connections given as environment variables


def airflow_conn_from_env(variable: str) -> dict[str, Any] | None:
    """Fields of the Airflow connection in env ``variable`` (URI or JSON form), as Airflow parses them."""
    import os

    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            data = json.loads(raw)
            extra = data.get("extra") or {}
            if isinstance(extra, str):
                extra = json.loads(extra) if extra.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{variable} is not a valid Airflow connection in JSON form: {exc}") from None
        port = data.get("port")
        return {
            "conn_type": _normalize_conn_type(data.get("conn_type") or ""),
            "host": data.get("host") or None,
            "port": int(port) if port not in (None, "") else None,
            "login": data.get("login") or None,
            "password": data.get("password") or None,
            "schema": data.get("schema") or None,
            "extra": dict(extra),
        }
    parts = urlsplit(raw)
    extra: dict[str, Any] = {}
    if parts.query:
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if "__extra__" in query:
            extra = json.loads(query["__extra__"])
        else:
            for key, value in query.items():
                try:
                    extra[key] = json.loads(value) if value else value
                except ValueError:
                    extra[key] = value
    return {
        "conn_type": _normalize_conn_type(parts.scheme),
        "host": unquote(parts.hostname) if parts.hostname else None,
        "port": parts.port,
        "login": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "schema": unquote(parts.path[1:]) if parts.path[1:] else None,
        "extra": extra,
    }


def _normalize_conn_type(conn_type: str) -> str:
    conn_type = conn_type.lower()
    return "postgres" if conn_type == "postgresql" else conn_type.replace("-", "_")


def postgres_url_from_conn(conn: Mapping[str, Any]) -> str:
    if conn["conn_type"] != "postgres":
        log.warning("%s has conn_type %r, expected 'postgres'; using it anyway", PG_CONN_ENV,
                    conn["conn_type"])
    params: dict[str, Any] = {
        "host": conn["host"],
        "port": conn["port"],
        "user": conn["login"],
        "password": conn["password"],
        "dbname": conn["schema"],
    }
    for key, value in conn["extra"].items():
        if key in _LIBPQ_EXTRAS or key == "host":
            params[key] = value
    return pg_url(params)


def redis_url_from_conn(conn: Mapping[str, Any]) -> str:
    """The redis-py URL of an Airflow redis connection (the hook reads ``db`` from the extra only)."""
    if conn["conn_type"] != "redis":
        log.warning("%s has conn_type %r, expected 'redis'; using it anyway", REDIS_CONN_ENV,
                    conn["conn_type"])
    extra = conn["extra"]
    password = conn["password"]
    if password is not None and str(password).lower() in ("none", "false", ""):
        password = None
    ssl = str(extra.get("ssl", "")).lower() in ("true", "1", "yes")
    return redis_url(conn["host"] or "localhost", int(conn["port"] or 6379), int(extra.get("db") or 0),
                     username=conn["login"], password=password, ssl=ssl)


def postgres_conn_uri(libpq_url: str, scheme: str = "postgres") -> str:
    """A libpq URL or DSN as a URI with ``scheme``: an Airflow connection (``postgres``) or SQLAlchemy's."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_url)
    host = str(params.pop("host", "") or "")
    port = params.pop("port", "")
    user = params.pop("user", None)
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    extra = {k: str(v) for k, v in params.items()}
    if host.startswith("/") or "," in host:
        extra["host"] = host
        host = ""
    auth = quote(str(user), safe="") if user else ""
    if password:
        auth += ":" + quote(str(password), safe="")
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host)
    netloc += f":{port}" if port and host else ""
    query = ("?" + urlencode(extra)) if extra else ""
    return f"{scheme}://{netloc}/{quote(str(dbname), safe='')}{query}"


def sqlalchemy_url(libpq_url: str) -> str:
    """A libpq URL or DSN as a SQLAlchemy URL with the psycopg 3 driver (Airflow's metadata database)."""
    return postgres_conn_uri(libpq_url, "postgresql+psycopg")


def environment(found: Services) -> dict[str, str]:
    """Environment variables that make other processes (Airflow, ``herald``) use the same services."""
    env = {"DATABASE_URL": found.database_url, PG_CONN_ENV: postgres_conn_uri(found.database_url)}
    if found.redis_url:
        env["REDIS_URL"] = found.redis_url
        parts = urlsplit(found.redis_url)
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            query_db = dict(parse_qsl(parts.query)).get("db")
            db = int(query_db or (parts.path.strip("/") or 0))
            redis_extra: dict[str, Any] = {"db": db}
            if parts.scheme == "rediss":
                redis_extra["ssl"] = "true"
            auth = quote(unquote(parts.username), safe="") if parts.username else ""
            if parts.password:
                auth += ":" + quote(unquote(parts.password), safe="")
            host = parts.hostname
            netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host)
            env[REDIS_CONN_ENV] = f"redis://{netloc}:{parts.port or 6379}/?{urlencode(redis_extra)}"
        else:
            log.warning("no Airflow connection for Redis at %s (not a TCP redis:// URL)",
                        redact_url(found.redis_url))
    return env
