"""Apply an Astro CLI ``airflow_settings.yaml`` to the configured Airflow, idempotently.

The whole file is read and validated first; any problem raises :class:`SettingsFileError`, which
names every offending entry, and nothing is written. Then each connection, pool and variable is
compared with the metadata DB (the one ``AIRFLOW_HOME`` / ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``
point at) and only what differs is written, all in one transaction. The :class:`Report` says, per
entry, ``created``, ``changed`` or ``unchanged``; a second run reports everything unchanged.

The file is the source of truth for every field it can express: a connection without
``conn_password`` ends up without a password. Fields it cannot express (a connection's
description, a pool's ``include_deferred``, a variable's description) are left as they are.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "MetadataDBError",
    "Outcome",
    "Report",
    "SettingsFile",
    "SettingsFileError",
    "apply_settings",
    "apply_settings_file",
    "load_settings_file",
]

CREATED, CHANGED, UNCHANGED = "created", "changed", "unchanged"

#: section of the file -> (kind of entry, key that names an entry, keys an entry may have)
_SECTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    "connections": (
        "connection",
        "conn_id",
        frozenset(
            "conn_id conn_type conn_host conn_schema conn_login conn_password conn_port conn_extra".split()
        ),
    ),
    "pools": ("pool", "pool_name", frozenset({"pool_name", "pool_slot", "pool_description"})),
    "variables": ("variable", "variable_name", frozenset({"variable_name", "variable_value"})),
}
#: What ``airflow.models.connection.sanitize_conn_id`` accepts (kept here so parsing needs no Airflow).
_CONN_ID = re.compile(r"[\w#!()\-.:/\\]{1,250}")


class SettingsFileError(Exception):
    """The settings file cannot be read or is invalid; nothing was applied."""


class MetadataDBError(SettingsFileError):
    """The file is valid but the Airflow metadata DB could not be read or written; nothing was applied."""


@dataclass(frozen=True)
class ConnectionSpec:
    name: str
    conn_type: str
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolSpec:
    name: str
    slots: int
    description: str | None = None


@dataclass(frozen=True)
class VariableSpec:
    name: str
    value: str


@dataclass(frozen=True)
class SettingsFile:
    connections: tuple[ConnectionSpec, ...] = ()
    pools: tuple[PoolSpec, ...] = ()
    variables: tuple[VariableSpec, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry; ``kind`` is connection, pool or variable."""

    kind: str
    name: str
    status: str
    fields: tuple[str, ...] = ()  # names of the changed fields, never values: no password reaches a log
    note: str = ""

    def line(self) -> str:
        text = f"{self.kind} {self.name}: {self.status}"
        if self.fields:
            text += f" ({', '.join(self.fields)})"
        if self.note:
            text += f"; {self.note}"
        return text


@dataclass(frozen=True)
class Report:
    outcomes: tuple[Outcome, ...]
    dry_run: bool = False

    def with_status(self, *statuses: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in statuses]

    def lines(self) -> list[str]:
        lines = [o.line() for o in self.outcomes]
        if self.dry_run:
            lines.append("dry run: nothing was written")
        return lines


# --- reading and validating -------------------------------------------------------------------


def load_settings_file(path: str | os.PathLike[str]) -> SettingsFile:
    """Parse and validate the whole file; raise :class:`SettingsFileError` listing every problem."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsFileError(f"{path}: not valid YAML: {exc}") from None
    errors: list[str] = []
    settings = _parse(data, errors)
    if errors:
        raise SettingsFileError(f"{path}: invalid, nothing applied:\n  " + "\n  ".join(errors))
    return settings


def _parse(data: Any, errors: list[str]) -> SettingsFile:
    if not isinstance(data, Mapping) or not isinstance(data.get("airflow"), Mapping):
        errors.append("expected a top-level 'airflow' mapping")
        return SettingsFile()
    errors += [f"unknown top-level key {key!r}" for key in data if key != "airflow"]
    airflow = data["airflow"]
    errors += [
        f"unknown key airflow.{key} (expected {', '.join(_SECTIONS)})"
        for key in airflow
        if key not in _SECTIONS
    ]
    parsers = {"connections": _connection, "pools": _pool, "variables": _variable}
    parsed: dict[str, tuple] = {}
    for section, (kind, name_key, keys) in _SECTIONS.items():
        specs = [
            parsers[section](_Entry(kind, item, name_key, keys, errors))
            for item in _items(airflow, section, errors)
        ]
        parsed[section] = _unique(kind, [spec for spec in specs if spec is not None], errors)
    return SettingsFile(**parsed)


def _items(airflow: Mapping[str, Any], section: str, errors: list[str]) -> list[tuple[int, Mapping]]:
    items = airflow.get(section) or []  # an empty section (`pools:`) is allowed
    if not isinstance(items, list):
        errors.append(f"airflow.{section} must be a list")
        return []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            errors.append(f"airflow.{section} entry #{index} must be a mapping, not {type(item).__name__}")
    return [(index, item) for index, item in enumerate(items, start=1) if isinstance(item, Mapping)]


class _Entry:
    """One entry of the file, collecting its errors under a label such as ``pool 'notifications'``."""

    def __init__(
        self, kind: str, item: tuple[int, Mapping], name_key: str, keys: frozenset[str], errors: list
    ):
        index, self.values = item
        name = self.values.get(name_key)
        self.label = f"{kind} {name!r}" if isinstance(name, str) and name else f"{kind} #{index}"
        self.errors, self.ok = errors, True
        for key in self.values:
            if key not in keys:
                self.error(f"unknown key {key!r} (expected {', '.join(sorted(keys))})")

    def error(self, message: str) -> None:
        self.errors.append(f"{self.label}: {message}")
        self.ok = False

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.values.get(key)
        if value is None or value == "":
            if required:
                self.error(f"missing {key}")
            return None
        if not isinstance(value, str):
            self.error(f"{key} must be a string (quote it in YAML), not {type(value).__name__}")
            return None
        return value


def _connection(e: _Entry) -> ConnectionSpec | None:
    conn_id, conn_type = e.text("conn_id", required=True), e.text("conn_type", required=True)
    if conn_id is not None and not _CONN_ID.fullmatch(conn_id):
        e.error("conn_id may only hold letters, digits, _ and #!()-.:/\\ (at most 250)")
    port = e.values.get("conn_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        e.error(f"conn_port must be an integer between 1 and 65535, not {port!r}")
    extra = _extra(e, e.values.get("conn_extra"))
    host, schema, login = e.text("conn_host"), e.text("conn_schema"), e.text("conn_login")
    password = e.text("conn_password")
    if not e.ok or conn_id is None or conn_type is None:
        return None
    return ConnectionSpec(conn_id, conn_type, host, schema, login, password, port, extra)


def _extra(e: _Entry, raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if not isinstance(raw, Mapping):
        e.error("conn_extra must be a mapping or a JSON object string")
        return {}
    try:
        return json.loads(json.dumps(dict(raw)))  # what Airflow stores must survive JSON
    except (TypeError, ValueError) as exc:
        e.error(f"conn_extra is not JSON-serialisable: {exc}")
        return {}


def _pool(e: _Entry) -> PoolSpec | None:
    name = e.text("pool_name", required=True)
    slots = e.values.get("pool_slot")
    if slots is None:
        e.error("missing pool_slot")
    elif isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        e.error(f"pool_slot must be an integer >= 0, not {slots!r}")
    description = e.text("pool_description")
    if not e.ok or name is None or slots is None:
        return None
    return PoolSpec(name, slots, description)


def _variable(e: _Entry) -> VariableSpec | None:
    name = e.text("variable_name", required=True)
    value = e.values.get("variable_value")
    if value is None:
        e.error('missing variable_value (write "" for an empty string)')
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        e.error(f"variable_value must be a string (quote it in YAML), not {type(value).__name__}")
    if not e.ok or name is None:
        return None
    return VariableSpec(name, str(value))


def _unique(kind: str, specs: list, errors: list[str]) -> tuple:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            errors.append(f"{kind} {spec.name!r}: declared more than once")
        seen.add(spec.name)
    return tuple(specs)


# --- applying ---------------------------------------------------------------------------------


def apply_settings_file(path: str | os.PathLike[str], *, dry_run: bool = False) -> Report:
    """Validate ``path`` whole, then create or update what differs in the metadata DB."""
    return apply_settings(load_settings_file(path), dry_run=dry_run)


def apply_settings(settings: SettingsFile, *, dry_run: bool = False) -> Report:
    """Compare ``settings`` with the metadata DB and write what differs, in one transaction."""
    from airflow import settings as airflow_config
    from airflow.utils.session import create_session
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        with create_session() as session:  # commits at the end, rolls back on any error
            outcomes = [
                *(_apply_connection(session, spec, dry_run) for spec in settings.connections),
                *(_apply_pool(session, spec, dry_run) for spec in settings.pools),
                *(_apply_variable(session, spec, dry_run) for spec in settings.variables),
            ]
            if dry_run:
                session.rollback()
    except (OperationalError, ProgrammingError) as exc:
        engine = airflow_config.engine
        url = engine.url.render_as_string(hide_password=True) if engine is not None else "?"
        raise MetadataDBError(
            f"Airflow metadata DB {url}: {exc.orig} (has `airflow db migrate` run?); nothing applied"
        ) from None
    return Report(tuple(outcomes), dry_run=dry_run)


def _apply_connection(session: Session, spec: ConnectionSpec, dry_run: bool) -> Outcome:
    from airflow.models.connection import Connection
    from sqlalchemy import select

    note = _env_note(f"AIRFLOW_CONN_{spec.name.upper()}")
    current = session.scalar(select(Connection).where(Connection.conn_id == spec.name))
    wanted = {
        "conn_type": spec.conn_type,
        "host": spec.host,
        "schema": spec.schema,
        "login": spec.login,
        "password": spec.password,
        "port": spec.port,
    }
    if current is None:
        if not dry_run:
            session.add(Connection(conn_id=spec.name, extra=spec.extra or None, **wanted))
        return Outcome("connection", spec.name, CREATED, note=note)
    differing = [name for name, value in wanted.items() if (getattr(current, name) or None) != value]
    if _stored_extra(current.extra) != spec.extra:
        differing.append("extra")
    if differing and not dry_run:
        for name in differing:
            if name == "extra":
                current.extra = json.dumps(spec.extra) if spec.extra else None
            elif name == "password" and spec.password is None:
                # Connection.password's setter ignores a falsy value: clear the column itself.
                current._password, current.is_encrypted = None, False
            else:
                setattr(current, name, wanted[name])
    return Outcome("connection", spec.name, CHANGED if differing else UNCHANGED, tuple(differing), note)


def _stored_extra(raw: str | None) -> dict[str, Any] | None:
    """The stored extra as a dict; ``None`` (differs from any file value) when it is not a JSON object."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _apply_pool(session: Session, spec: PoolSpec, dry_run: bool) -> Outcome:
    from airflow.models.pool import Pool
    from sqlalchemy import select

    current = session.scalar(select(Pool).where(Pool.pool == spec.name))
    differing: tuple[str, ...] = ()
    if current is not None:
        differing = tuple(
            name
            for name, same in (
                ("slots", current.slots == spec.slots),
                ("description", (current.description or None) == spec.description),
            )
            if not same
        )
    status = CREATED if current is None else CHANGED if differing else UNCHANGED
    if status != UNCHANGED and not dry_run:
        Pool.create_or_update_pool(
            name=spec.name,
            slots=spec.slots,
            description=spec.description,
            include_deferred=current.include_deferred if current is not None else False,
            team_name=current.team_name if current is not None else None,
            session=session,
        )
    return Outcome("pool", spec.name, status, differing)


def _apply_variable(session: Session, spec: VariableSpec, dry_run: bool) -> Outcome:
    from airflow.models.variable import Variable
    from sqlalchemy import select

    note = _env_note(f"AIRFLOW_VAR_{spec.name.upper()}")
    current = session.scalar(select(Variable).where(Variable.key == spec.name))
    if current is not None and current.val == spec.value:  # ``val`` is decrypted with the Fernet key
        return Outcome("variable", spec.name, UNCHANGED, note=note)
    if not dry_run:
        # An upsert in this session; keeps the description, encrypts when a Fernet key is set.
        description = current.description if current is not None else None
        Variable.set(spec.name, spec.value, description=description, session=session)
    return Outcome("variable", spec.name, CREATED if current is None else CHANGED, note=note)


def _env_note(env_name: str) -> str:
    if env_name in os.environ:
        return f"{env_name} is set here and takes precedence over the metadata DB"
    return ""
