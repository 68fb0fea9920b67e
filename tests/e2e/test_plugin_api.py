"""The herald plugin inside a real ``airflow api-server``: its JSON endpoints, its page, and their auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from herald.config import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_stats_endpoint_reports_the_seeded_queue(airflow_server, seeded):
    with airflow_server.client(airflow_server.token()) as http:
        response = http.get("/herald/api/stats")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    stats = response.json()
    assert stats["backlog"] == seeded["backlog"]
    assert stats["claims"] == seeded["claims"]
    assert stats["outcomes_last_hour"] == seeded["outcomes_last_hour"]
    for window in ("last_hour", "last_24h"):
        for key, value in seeded[window].items():
            assert stats["throughput"][window][key] == value, (window, key)
    # the cache counters were read from the namespace of the Airflow Variable herald_cache_namespace
    assert stats["cache"] == seeded["cache"]
    ages = stats["oldest_pending_age_seconds"]
    assert 100 <= ages["normal"] < 400 and 60 <= ages["urgent"] < 400
    assert [r["run_id"] for r in stats["recent_runs"]] == seeded["recent_runs"]
    points = stats["series"]["points"]
    assert len(points) == 24
    assert sum(p["delivered"] for p in points) == seeded["last_24h"]["notifications_delivered"]
    assert sum(p["triggers_processed"] for p in points) == seeded["last_24h"]["triggers_processed"]
    assert points[-1]["backlog"] == seeded["backlog"]["total"]
    # the hourly runs recorded a backlog: the chart has a day of it, not only the current value
    assert sum(p["backlog"] is not None for p in points) >= 20
    # this API server runs the LocalExecutor: no queues, said so, instead of zeros
    executor = stats["executor"]
    assert executor["executor"] == "LocalExecutor" and executor["has_queues"] is False
    assert executor["queues"] == [] and "ignores task queues" in executor["note"]


def test_failed_endpoint_lists_reasons_not_payloads(airflow_server, seeded):
    with airflow_server.client(airflow_server.token()) as http:
        response = http.get("/herald/api/failed", params={"limit": 10})
        one = http.get("/herald/api/failed", params={"limit": 1})
        invalid = [http.get("/herald/api/failed", params={"limit": n}).status_code for n in (0, 501, "x")]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["limit"] == 10
    assert [t["last_error"] for t in body["triggers"]] == seeded["failed_reasons"]
    assert all(t["trigger_type"] == "price_drop" for t in body["triggers"])
    assert "private payload" not in response.text
    assert [t["last_error"] for t in one.json()["triggers"]] == seeded["failed_reasons"][:1]
    assert invalid == [422, 422, 422]


def test_page_is_served_to_an_authenticated_user(airflow_server):
    token = airflow_server.token()
    with airflow_server.client() as http:
        # the UI's way: the _token cookie, as the page opened from the nav entry sends it
        response = http.get("/herald/", cookies={"_token": token})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert 'id="backlog-total"' in html and "api/stats" in html
    assert "<script src=" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    ).replace("http://www.w3.org/2000/svg", ""), "the page must be self-contained (no CDN)"


@pytest.mark.parametrize("path", ["/herald/", "/herald/api/stats", "/herald/api/failed?limit=5"])
def test_every_route_requires_authentication(airflow_server, path):
    with airflow_server.client() as http:
        anonymous = http.get(path)
        forged = http.get(path, headers={"Authorization": "Bearer not-a-token"})
        bad_cookie = http.get(path, cookies={"_token": "not-a-token"})
    assert anonymous.status_code in (401, 403), (anonymous.status_code, anonymous.text[:200])
    assert forged.status_code in (401, 403), forged.status_code
    assert bad_cookie.status_code in (401, 403), bad_cookie.status_code
    assert "backlog" not in anonymous.text


def test_no_unauthenticated_docs(airflow_server):
    with airflow_server.client() as http:
        for path in ("/herald/docs", "/herald/openapi.json", "/herald/redoc"):
            response = http.get(path)
            assert response.status_code in (401, 403, 404), (path, response.status_code)
            assert "openapi" not in response.text.lower(), path
        assert http.get("/herald/openapi.json").status_code == 401
        assert http.get("/herald/openapi.json", headers={"Authorization": "Bearer x.y.z"}).status_code == 403


def test_openapi_schema_is_served_behind_the_login_and_documents_auth(airflow_server):
    with airflow_server.client(airflow_server.token()) as http:
        response = http.get("/herald/openapi.json")
        docs = http.get("/herald/docs")
    assert response.status_code == 200, response.text
    schema = response.json()
    assert set(schema["paths"]) == {"/api/stats", "/api/failed", "/"}
    for path, methods in schema["paths"].items():
        responses = methods["get"]["responses"]
        assert {"200", "401", "403"} <= set(responses), (path, sorted(responses))
        assert "Not authenticated" in responses["401"]["description"]
        assert "Invalid JWT token" in responses["403"]["description"]
        assert methods["get"]["security"], path  # Airflow's bearer / OAuth2 schemes
    assert "503" in schema["paths"]["/api/stats"]["get"]["responses"]
    assert "422" in schema["paths"]["/api/failed"]["get"]["responses"]
    stats_schema = schema["components"]["schemas"]["Stats"]
    assert {"backlog", "executor", "recent_runs"} <= set(stats_schema["properties"])
    assert docs.status_code == 404  # no Swagger UI (it would load assets from a CDN)


def test_api_fuzzed_with_schemathesis(airflow_server, seeded):
    """Generated requests (valid and invalid) against every operation: no 5xx, every status and body as
    documented, invalid input refused, and no operation answers without credentials."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    token = airflow_server.token()
    auth = {"Authorization": f"Bearer {token}"}
    with airflow_server.client(token) as http:
        raw = http.get("/herald/openapi.json").json()
    base_url = f"{airflow_server.base_url}/herald"
    schema = schemathesis.openapi.from_dict(raw)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection, ignored_auth]
    calls: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.label for op in operations) == ["GET /", "GET /api/failed", "GET /api/stats"]
    def fuzz(operation, mode) -> None:
        key = f"{operation.label} {mode.value}"

        @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call_and_validate(base_url=base_url, headers=auth, checks=checks)
            calls.setdefault(key, set()).add(response.status_code)

        run()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    assert calls["GET /api/stats positive"] == {200}
    assert 200 in calls["GET /api/failed positive"]
    assert 422 in calls["GET /api/failed negative"], calls  # out-of-range or non-integer limits refused


def test_wrong_password_gets_no_token(airflow_server):
    response = httpx.post(
        f"{airflow_server.base_url}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=30
    )
    assert response.status_code == 401


def test_plugins_endpoint_lists_herald(airflow_server):
    with airflow_server.client(airflow_server.token()) as http:
        response = http.get("/api/v2/plugins")
    assert response.status_code == 200, response.text
    plugins = {p["name"]: p for p in response.json()["plugins"]}
    assert "herald" in plugins, sorted(plugins)
    herald = plugins["herald"]
    assert [a["url_prefix"] for a in herald["fastapi_apps"]] == ["/herald"]
    views = herald["external_views"]
    assert [(v["name"], v["href"], v["url_route"]) for v in views] == [
        ("Notifications", "/herald/", "herald")
    ]
    assert not response.json().get("import_errors"), response.json()


def test_database_down_answers_503_without_details(airflow_server, db_url):
    """A stats request while the database refuses: 503, no connection string in the answer."""
    name = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(make_conninfo(db_url, dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')  # fixed test database name
        try:
            with airflow_server.client(airflow_server.token()) as http:
                response = http.get("/herald/api/stats")
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert response.status_code == 503, response.text
    assert "unavailable" in response.json()["detail"]
    assert name not in response.text and "127.0.0.1" not in response.text


def test_plugin_module_imports_nothing_heavy():
    """Every Airflow process (each task's too) imports the plugins folder: the app is built lazily."""
    code = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("herald_plugin", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
heavy = ["fastapi", "starlette", "airflow.api_fastapi.core_api.security", "herald.stats", "psycopg", "redis",
         "airflow.providers.postgres.hooks.postgres", "airflow.providers.redis.hooks.redis"]
print(json.dumps({"loaded": [m for m in heavy if m in sys.modules],
                  "views": [v["name"] for v in module.HeraldPlugin.external_views],
                  "prefixes": [a["url_prefix"] for a in module.HeraldPlugin.fastapi_apps]}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT_ROOT / "plugins" / "herald_plugin.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "True"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "views": ["Notifications"], "prefixes": ["/herald"]}
