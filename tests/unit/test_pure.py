"""Pure functions: no services needed."""

from __future__ import annotations

import pytest

from herald.claiming import Batch, Claimed, plan_batches
from herald.config import Settings, defaults
from herald.ratelimit import Candidate, counts_decide
from herald.templates import RenderError, Template


def test_plan_batches_urgent_first_bounded_and_leftover():
    claimed = [Claimed(1, "normal", 5), Claimed(2, "urgent", 3), Claimed(3, "normal", 5),
               Claimed(4, "normal", 12), Claimed(5, "normal", 0)]
    batches, priorities, sizes, leftover = plan_batches(claimed, batch_size=10, max_batches=3)
    assert batches == [[2], [1, 3], [4]]
    assert priorities == ["urgent", "normal", "normal"]
    assert sizes == [3, 10, 12]
    assert leftover == [5]


def test_plan_batches_counts_a_trigger_without_recipients_as_one():
    batches, _, sizes, _ = plan_batches([Claimed(1, "normal", 0), Claimed(2, "normal", 0)], batch_size=1,
                                        max_batches=10)
    assert batches == [[1], [2]] and sizes == [1, 1]


def test_plan_batches_isolates_suspects_and_bounds_them():
    """A trigger whose processing started before and never finished gets a batch of its own (at most
    ``max_suspects`` of them per run), so a poison one cannot take innocents down with it again."""
    claimed = [Claimed(i, "normal", 2, suspect=i in (2, 3, 4)) for i in range(1, 7)]
    batches, _, _, leftover = plan_batches(claimed, batch_size=100, max_batches=10, max_suspects=2)
    assert batches == [[1], [2], [3], [5, 6]]  # still in id order: batches run in this order
    assert leftover == [4]


def test_batch_round_trips_through_xcom_dict():
    b = Batch("run", 3, "urgent", 7, 4_800)
    assert Batch.from_dict(b.to_dict()) == b
    assert b.to_dict()["label"] == "urgent · 4,800 users · 7 triggers"


def test_counts_decide_limit_and_urgent():
    cands = [Candidate(1, False) for _ in range(4)] + [Candidate(1, True), Candidate(2, False)]
    assert counts_decide(cands, {1: 1, 2: 3}, limit=3) == [True, True, False, False, True, False]


def test_counts_decide_a_user_owed_a_digest_gets_no_new_normal_one_before_it():
    cands = [Candidate(1, False), Candidate(2, False), Candidate(1, True)]
    assert counts_decide(cands, {}, limit=3, held={1}) == [False, True, True]


def test_template_renders_payload_as_data():
    t = Template("x", "Hi {{ name }}", "{{ name }} / {{ n }}")
    assert t.render({"name": "{{ 7*7 }}", "n": 3}) == ("Hi {{ 7*7 }}", "{{ 7*7 }} / 3")


def test_template_missing_field_names_it():
    with pytest.raises(RenderError, match="new_price"):
        Template("price_drop", "{{ item_name }}", "{{ new_price }}").render({"item_name": "Lamp"})


def test_template_sandbox_blocks_attribute_escapes():
    evil = Template("x", "{{ ''.__class__.__mro__ }}", "b")
    with pytest.raises(RenderError):
        evil.render({})


def test_payload_must_be_an_object():
    with pytest.raises(RenderError, match="JSON object"):
        Template("x", "a", "b").render(["not", "a", "mapping"])


def test_settings_from_env_and_bad_values():
    s = Settings.from_env({"AIRFLOW_VAR_HERALD_RATE_LIMIT": "7", "HERALD_CACHE_NAMESPACE": "ns:v2"})
    assert s.rate_limit == 7 and s.cache_namespace == "ns:v2" and s.batch_size == Settings().batch_size
    with pytest.raises(ValueError, match="herald_batch_size"):
        Settings.from_env({"HERALD_BATCH_SIZE": "lots"})
    assert defaults()["herald_rate_limit"] == 20


@pytest.mark.parametrize(("variable", "value"), [
    ("HERALD_MAX_BATCHES_PER_RUN", "0"),
    ("HERALD_MAX_BATCHES_PER_RUN", "5000"),  # over Airflow's max_map_length
    ("HERALD_RATE_WINDOW_SECONDS", "0"),
    ("HERALD_RATE_LIMIT", "-1"),
    ("HERALD_BATCH_SIZE", "0"),
    ("HERALD_CLAIM_LEASE_SECONDS", "0"),
    ("HERALD_CACHE_NAMESPACE", "has space"),
])
def test_settings_refuse_nonsense_naming_the_variable(variable, value):
    with pytest.raises(ValueError, match=variable.lower()):
        Settings.from_env({variable: value})

