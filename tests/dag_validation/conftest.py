"""The DAG folder the integrity tests parse. The throwaway Airflow home they run in is set by
``tests/conftest.py`` before anything imports ``airflow``. No metadata DB is needed: the tests read
``DagBag.dags`` (parsing only), never ``DagBag.get_dag()``, which queries the DB.

``HERALD_DAG_FOLDER`` points the tests at another folder of DAG files (to check the checks).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from herald.config import PROJECT_ROOT

DAG_FOLDER = Path(os.environ.get("HERALD_DAG_FOLDER", PROJECT_ROOT / "dags")).resolve()

@pytest.fixture(scope="session")
def dag_folder() -> Path:
    return DAG_FOLDER
