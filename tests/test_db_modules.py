"""How the registry package is laid out, and the enums of what it stores.

``db.service`` is a facade over modules named after their job (states, mappers, intake,
queries, actions, lease) and ``db.bundle``; none of them imports the facade, so there is no
import cycle. Worker statuses and job error codes are :class:`~db.models.WorkerStatus` and
:class:`~db.models.ErrorCode`, stored as the same plain strings as before.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from db import LOCAL, ErrorCode, JobStatus, Registry, WorkerStatus, service
from db.models import Job, WorkerRow
from tests.conftest import REPO

DB_DIR = REPO / "db"
SPLIT = ("states", "mappers", "intake", "queries", "actions", "lease", "bundle")


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    yield r
    r.close()


def _queue(reg: Registry, tmp_path: Path) -> int:
    p = tmp_path / "in.mp4"
    p.write_bytes(b"not decoded here")
    return service.submit_file(reg, p, {"landmarks": "mtcnn", "formats": ["npz"]}).id


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("first", ["db.bundle", "db.lease", "db.queries", "db.actions"])
def test_any_db_module_imports_first_in_a_fresh_interpreter(first):
    code = f"import {first}; from db import service; print(service.build_bundle.__module__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "db.bundle"


def test_no_module_of_db_imports_the_service_facade():
    """Only ``db/__init__.py`` (the package's exports) imports :mod:`db.service`; no function
    imports anything at call time to dodge a cycle."""
    offenders = []
    for path in sorted(DB_DIR.glob("*.py")):
        if path.name in ("__init__.py", "service.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if "db.service" in names:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_the_facade_reexports_every_operation_from_its_module():
    assert sorted(service.__all__) == sorted(set(service.__all__))
    homes = {}
    for name in service.__all__:
        obj = getattr(service, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            homes[name] = obj.__module__
    assert {h.removeprefix("db.") for h in homes.values()} <= set(SPLIT) | {"views"}
    assert homes["build_bundle"] == "db.bundle" and homes["adopt_job"] == "db.lease"
    assert homes["transition"] == "db.states" and homes["submit_file"] == "db.intake"
    assert len((DB_DIR / "service.py").read_text().splitlines()) < 150


# ------------------------------------------------------------------------------------ enums


def _engine_error_classes() -> list[type]:
    """Every StudioError subclass defined anywhere in the engine package."""
    from engine.errors import StudioError

    imported = []
    for mod in pkgutil.walk_packages(engine.__path__, "engine."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:  # an optional dependency; its errors are checked where it is installed
            continue
        imported.append(mod.name)
    assert {"engine.errors", "engine.align"} <= set(imported)
    found, todo = [], [StudioError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith("engine")]


def test_every_engine_error_code_is_an_error_code():
    classes = _engine_error_classes()
    assert len(classes) >= 14
    known = {e.value for e in ErrorCode}
    missing = {f"{c.__module__}.{c.__qualname__}": c.code for c in classes if c.code not in known}
    assert missing == {}, "add these codes to db.models.ErrorCode"
    assert all(ErrorCode(c.code).value == c.code for c in classes)


def test_fault_codes_and_the_workers_own_codes_are_error_codes():
    from db import faults

    for code in (faults.DB_BUSY, faults.DISK_FULL, faults.READ_ONLY, faults.DISK_IO, faults.DB_UNAVAILABLE):
        assert type(code) is str and ErrorCode(code).value == code
    assert {"abandoned", "requeued", "internal"} <= {c.value for c in ErrorCode}
    assert [s.value for s in WorkerStatus] == ["idle", "busy", "paused", "stopped", "lost"]


def _raw(reg: Registry, model, key, column: str):
    """The value of ``column`` as read back from the database file."""
    with reg.session() as s:
        return getattr(s.get(model, key), column)


def test_enums_are_stored_as_the_same_plain_strings(reg, tmp_path):
    job_id = _queue(reg, tmp_path)
    service.register_worker(reg, "w1", hostname="h", pid=1, device="cpu")
    assert (_raw(reg, WorkerRow, "w1", "status"), service.list_workers(reg)[0].status) == ("idle", "idle")
    service.worker_heartbeat(reg, "w1", status=WorkerStatus.PAUSED, message="paused: disk full")
    assert type(_raw(reg, WorkerRow, "w1", "status")) is str and _raw(reg, WorkerRow, "w1", "status") == "paused"
    with pytest.raises(ValueError):
        service.worker_heartbeat(reg, "w1", status="sleeping")
    assert service.claim_next(reg, "w1").id == job_id
    assert _raw(reg, WorkerRow, "w1", "status") == "busy"

    failed = service.fail_job(reg, job_id, "w1", error="boom", code=ErrorCode.INTERNAL)
    assert failed.error_code == "internal" and type(_raw(reg, Job, job_id, "error_code")) is str
    service.retry_job(reg, job_id, actor=LOCAL)
    service.claim_next(reg, "w1")
    assert service.fail_job(reg, job_id, "w1", error="no face found", code="no_face").error_code == "no_face"
    service.retry_job(reg, job_id, actor=LOCAL)
    service.claim_next(reg, "w1")
    back = service.requeue_job(reg, job_id, "w1", reason="shutting down")
    assert (back.status, back.error_code) == (JobStatus.QUEUED, ErrorCode.REQUEUED) == (JobStatus.QUEUED, "requeued")
    service.stop_worker(reg, "w1")
    assert _raw(reg, WorkerRow, "w1", "status") == "stopped"
