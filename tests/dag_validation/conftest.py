"""A throwaway Airflow home for the DAG integrity tests, set before anything imports ``airflow``.

Airflow reads its configuration once, when ``airflow`` is first imported, and pytest imports this
file before the test modules of this folder, so the environment below is what Airflow sees. No
metadata DB is needed: the tests read ``DagBag.dags`` (parsing only), never ``DagBag.get_dag()``,
which queries the DB.

``HERALD_DAG_FOLDER`` points the tests at another folder of DAG files (to check the checks).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from herald.config import PROJECT_ROOT

DAG_FOLDER = Path(os.environ.get("HERALD_DAG_FOLDER", PROJECT_ROOT / "dags")).resolve()

if "airflow" in sys.modules:  # pragma: no cover - only when another test module imported it first
    warnings.warn(
        "airflow was imported before tests/dag_validation/conftest.py: the DAG integrity tests use the "
        f"Airflow configuration of AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME', '~/airflow')}",
        stacklevel=1,
    )
else:
    _home = tempfile.mkdtemp(prefix="herald-dag-validation-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ.update(
        {
            "AIRFLOW_HOME": _home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_home}/airflow.db",
        }
    )


@pytest.fixture(scope="session")
def dag_folder() -> Path:
    return DAG_FOLDER
