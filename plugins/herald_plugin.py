"""The "Notifications" view of the Airflow UI, and its JSON API, served by the Airflow API server.

Mounted under ``/herald`` by ``airflow api-server`` (``fastapi_apps``), with a nav entry that shows
``/herald/`` inside the UI (``external_views``). The app itself, its routes (``/herald/``,
``/herald/api/stats``, ``/herald/api/failed``, ``/herald/openapi.json``) and their authentication are in
``herald.webapp``; the page's files are in ``plugins/herald_web/``.

This module is imported by *every* Airflow process that loads plugins (scheduler, dag-processor, each
task's process for its macros), not only by the API server. So it imports nothing but ``AirflowPlugin``
and the standard library, and connects to nothing: the FastAPI app (and the API server's security
module, ``herald.stats``, the provider hooks) is built on the first request, in the API server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/herald"
WEB_DIR = Path(__file__).resolve().parent / "herald_web"


class HeraldApp:
    """The ASGI app mounted at ``/herald``: builds ``herald.webapp.create_app`` on the first request.

    See the module docstring for why the FastAPI app is not built at import time.
    """

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from herald.webapp import create_app

                    self._app = create_app(WEB_DIR)
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.get()(scope, receive, send)


app = HeraldApp()

_BELL = (
    "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24' fill='none' stroke='{color}' "
    "stroke-width='2' stroke-linecap='round' stroke-linejoin='round'><path d='M6 8a6 6 0 0 1 12 0c0 7 3 9 3 "
    "9H3s3-2 3-9'/><path d='M10.3 21a1.94 1.94 0 0 0 3.4 0'/></svg>"
)


def _icon(color: str) -> str:
    from urllib.parse import quote

    return "data:image/svg+xml," + quote(_BELL.format(color=color))


class HeraldPlugin(AirflowPlugin):
    name = "herald"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "herald"}]
    external_views = [
        {
            "name": "Notifications",
            "href": f"{URL_PREFIX}/",
            "url_route": "herald",
            "destination": "nav",
            "nav_top_level": True,
            # orange: readable on the light nav, the dark nav and the selected (navy) item alike
            "icon": _icon("#dd6b20"),
            "icon_dark_mode": _icon("#f6ad55"),
        }
    ]
