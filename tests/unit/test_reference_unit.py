"""The reference processor stays an independent reading of the rules (no database needed)."""

from __future__ import annotations

import ast
import re

from herald import reference
from herald.config import PROJECT_ROOT, SQL_DIR

SOURCE = (PROJECT_ROOT / "herald" / "reference.py").read_text()
FAST_PATH = {"herald.processing", "herald.ratelimit", "herald.cache", "herald.claiming", "herald.digests",
             "herald.pipeline"}


def _imports() -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_reference_shares_no_rule_logic_with_the_fast_path():
    assert not _imports() & FAST_PATH
    assert "herald.templates" in _imports()  # the one thing it shares: rendering


def test_every_statement_is_a_reference_sql_file_with_one_statement():
    names = set(re.findall(r'"(reference_[a-z_]+)"', SOURCE))
    assert len(names) >= 10
    for name in names:
        text = (SQL_DIR / f"{name}.sql").read_text()
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--")).strip()
        assert body and ";" not in body, name
        assert "{" not in body, f"{name}: parameters are %(name)s placeholders"


def test_digest_wording():
    assert reference.DIGEST_TITLE.format(held=3) == "3 more updates on your favorites"
    assert reference.RATE_LIMITED_REASON == "over the per-user rate limit"


def test_trigger_kind():
    direct = reference.Trigger(1, "price_drop", "item", 1, 7, "urgent", {})
    fanout = reference.Trigger(2, "price_drop", "item", 1, None, "normal", {})
    assert direct.direct and direct.urgent
    assert not fanout.direct and not fanout.urgent
