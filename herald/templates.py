"""Per-type notification templates, rendered in a Jinja sandbox with a trigger's payload.

Templates live in the ``notification_templates`` table (built-ins seeded by migration 0003), so a type
can be added or overridden with an INSERT or UPDATE, no code change; a batch reads them with its
triggers (load_batch_triggers.sql). The payload is data: its values
are inserted as text and never evaluated, so ``{{ 7*7 }}`` in a payload appears literally.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


#: Longest title and body a notification may have: a payload that renders longer fails its trigger
#: with a reason instead of writing megabytes into every recipient's inbox.
MAX_TITLE_CHARS = 1_000
MAX_BODY_CHARS = 10_000


class RenderError(ValueError):
    """A trigger whose notification cannot be rendered; the message is the trigger's ``last_error``."""


@dataclass(frozen=True)
class Template:
    trigger_type: str
    title: str
    body: str
    bypass_preferences: bool = False

    def render(self, payload: Mapping[str, Any]) -> tuple[str, str]:
        """``(title, body)`` for ``payload``; raises RenderError naming a missing field."""
        if not isinstance(payload, Mapping):
            raise RenderError(f"payload must be a JSON object, got {type(payload).__name__}")
        try:
            title, body = _compile(self.title).render(payload), _compile(self.body).render(payload)
        except UndefinedError as exc:
            raise RenderError(
                f"payload is missing a field the {self.trigger_type} template needs: {_field(exc)}"
            ) from None
        except TemplateError as exc:
            raise RenderError(f"template for {self.trigger_type} failed: {exc}") from None
        except Exception as exc:  # a template's own arithmetic on this payload (division by zero, types)
            raise RenderError(
                f"template for {self.trigger_type} failed on this payload: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        for part, text, limit in (("title", title, MAX_TITLE_CHARS), ("body", body, MAX_BODY_CHARS)):
            if len(text) > limit:
                raise RenderError(f"rendered {part} is {len(text):,} characters, more than the {limit:,} allowed")
        return title, body


def _field(exc: UndefinedError) -> str:
    # Jinja says "'item_name' is undefined"; keep the name only.
    message = str(exc.message or exc)
    return message.split("'")[1] if message.count("'") >= 2 else message


_compiled: dict[str, Any] = {}


def _compile(source: str) -> Any:
    template = _compiled.get(source)
    if template is None:
        template = _compiled[source] = _ENV.from_string(source)
    return template
