"""Security: weight files are data (a malicious pickle never runs, through every entry point),
sign-in and roles off localhost (checked in the service layer), allowed import roots."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from dashboard import auth
from db import LOCAL, Actor, ImportPolicy, JobStatus, PermissionDenied, Registry, service
from db.access import display_path, may_read, relative_text
from engine.errors import CheckpointError, WeightsError
from engine.regressor import inspect_checkpoint, load_checkpoint
from tests.conftest import REPO
from tests.dashboard_fixtures import make_clip, served_on
from tests.factories import random_state_dict

APP = REPO / "streamlit_app.py"
SETTINGS = {"landmarks": "mtcnn", "formats": ["npz"]}


# =============================================================================== malicious pickles


class _Reduce:
    """An object whose unpickling calls ``func(*args)``: what an attacker puts in a ``.pth``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_evil(path: Path, kind: str, marker: Path) -> str:
    """Write a checkpoint whose loading would create ``marker``; returns the global it needs.

    ``subprocess``: a bare pickle (``pickle.dumps``) calling ``subprocess.call`` — the
    attack of issue 9, which the old ``weights_only=False`` fallback ran. ``system``:
    ``os.system`` inside a ``torch.save`` zip next to real weights. ``exec``: ``builtins.exec``
    of Python source, in a zip.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "subprocess":
        path.write_bytes(pickle.dumps({"net_recon": _Reduce(subprocess.call, ["touch", str(marker)])}, protocol=2))
        return "subprocess.call"
    if kind == "system":
        sd = {k: v for k, v in list(random_state_dict().items())[:4]}
        torch.save({"net_recon": sd, "opt_00": _Reduce(os.system, f"touch {marker}")}, path)
        return "posix.system" if os.name == "posix" else "nt.system"
    if kind == "exec":
        torch.save({"net_recon": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()")}, path)
        return "builtins.exec"
    raise ValueError(kind)


EVIL_KINDS = ("subprocess", "system", "exec")


@pytest.fixture
def marker(tmp_path) -> Path:
    """The file a malicious pickle would create; asserted absent after every test using it."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "code from a weight file ran"


def _refused(message: str, global_name: str) -> bool:
    return f"asks for the Python object '{global_name}'" in message and "loaded as data only" in message


@pytest.mark.parametrize("kind", EVIL_KINDS)
def test_checkpoint_loader_refuses_malicious_pickles(tmp_path, marker, kind):
    path = tmp_path / "epoch_20.pth"
    name = write_evil(path, kind, marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert _refused(str(info.value), name), str(info.value)
    assert "\n" not in str(info.value)
    report = inspect_checkpoint(path)
    assert not report.ok and _refused(report.message, name)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # must not re-enable a full unpickle
    env["STUDIO_CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    return env


def test_cli_extract_refuses_a_malicious_checkpoint(tmp_path, marker):
    """Entry point 1: ``python -m engine extract --checkpoint EVIL``."""
    clip = make_clip(tmp_path / "clip.mp4", n=3, size=(64, 48))
    evil = tmp_path / "dl" / "epoch_20.pth"
    name = write_evil(evil, "subprocess", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "extract", str(clip), "-o", str(tmp_path / "out"), "--checkpoint", str(evil),
         "--landmarks", "mtcnn", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=_clean_env(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr
    assert _refused(proc.stderr, name), proc.stderr
    assert "stopping: the model cannot be loaded" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*.*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("kind", EVIL_KINDS)
def test_validate_module_refuses_a_malicious_checkpoint(tmp_path, marker, kind):
    """Entry point 2: ``python -m dashboard.validate checkpoint EVIL`` (also as face_alignment weights)."""
    evil = tmp_path / "epoch_20.pth"
    name = write_evil(evil, kind, marker)
    for what in ("checkpoint", "sfd"):
        proc = subprocess.run([sys.executable, "-m", "dashboard.validate", what, str(evil)], capture_output=True,
                              text=True, timeout=300, cwd=REPO, env=_clean_env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["ok"] is False and _refused(row["message"], name), row


@pytest.fixture(autouse=True, scope="module")
def _served_locally():
    """Served on 127.0.0.1 unless a test says otherwise (served_on), whatever the cwd."""
    with served_on("127.0.0.1"):
        yield


def app(secrets: dict | None = None, user: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if secrets:
        at.secrets.update(secrets)
    if user:
        at.user = user
    return at


def visit(at: AppTest, page: str | None = None) -> AppTest:
    """Open the app (and then ``page`` through its navigation)."""
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def deep_link(page: str | None, secrets: dict | None = None, **query) -> AppTest:
    """Open ``/page`` directly, the way a bookmarked URL reaches a fresh server: Streamlit runs the
    page's own script first (its ``pages/`` folder mode), not the entry point."""
    script = APP if page is None else REPO / "pages" / f"{page}.py"
    at = AppTest.from_file(str(script), default_timeout=60)
    if secrets:
        at.secrets.update(secrets)
    at.query_params.update({k: str(v) for k, v in query.items()})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def everything(at: AppTest) -> str:
    """Every text the page drew (markdown, captions, titles, alerts, tables, widgets' labels)."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [t.value for t in at.title]
    parts += [t.value for t in at.subheader]
    for kind in ("error", "warning", "info", "success"):
        parts += [e.value for e in getattr(at, kind)]
    parts += [str(d.value) for d in at.dataframe] + [str(t.value) for t in at.table]
    parts += [w.label for w in at.button] + [e.label for e in at.expander]
    parts += [b.proto.label for b in at.get("download_button")]
    return "\n".join(parts)


def test_models_page_check_and_install_refuses_a_malicious_checkpoint(studio, marker):
    """Entry point 3: the Models page's "Check and install", by upload and by server path."""
    _, _, tmp = studio
    evil = tmp / "dl" / "epoch_20.pth"
    name = write_evil(evil, "subprocess", marker)
    at = visit(app(), "setup")
    at.file_uploader(key="setup_upload_checkpoint").upload("epoch_20.pth", evil.read_bytes()).run()
    at.button(key="setup_install").click().run()
    errors = [e.value for e in at.error]
    assert any("epoch_20.pth was not installed" in e and _refused(e, name) for e in errors), errors
    assert not any(".part-" in e for e in errors)  # the upload is named as the user named it

    at.segmented_control(key="setup_how").set_value("Path on this server").run()
    at.text_input(key="setup_path").set_value(str(evil)).run()
    at.button(key="setup_install").click().run()
    assert sum(_refused(e.value, name) for e in at.error) == 1
    assert not (tmp / "checkpoints").exists() or not any((tmp / "checkpoints").iterdir())


def test_fan_landmarker_refuses_malicious_weights(tmp_path, monkeypatch, marker):
    """face_alignment's files in $TORCH_HOME are read weights-only too (S3FD would otherwise go
    through torch.hub's full unpickle)."""
    pytest.importorskip("face_alignment", reason="face_alignment not installed")
    from engine.landmarks import fan

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, _ in fan.WEIGHTS:
        write_evil(fan.weights_dir() / name, "subprocess", marker)
    with pytest.raises(WeightsError) as info:
        fan.FanLandmarker("cpu", allow_download=False)
    assert _refused(str(info.value), "subprocess.call")


def test_nothing_in_the_project_unpickles_outside_the_safe_loader():
    """No full unpickle anywhere: weights_only=False, allow_pickle=True, pickle/joblib/jit loads."""
    pattern = re.compile(
        r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(|joblib\.load|torch\.jit\.load|"
        r"load_state_dict_from_url|torch\.load\("
    )
    hits = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests") or rel.as_posix() == "engine/safe_load.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, hits


# =============================================================================== sign-in settings


def test_password_hashes_are_salted_scrypt_and_checked():
    a, b = auth.hash_password("correct horse"), auth.hash_password("correct horse")
    assert a != b and a.startswith("scrypt$16384$8$1$")  # fresh salt each time
    assert auth.verify_password("correct horse", a) and auth.verify_password("correct horse", b)
    assert not auth.verify_password("correct horsE", a)
    assert not auth.verify_password("correct horse", "scrypt$garbage") and not auth.verify_password("x", "")
    with pytest.raises(ValueError):
        auth.hash_password("")


def test_auth_config_is_read_and_bad_entries_are_named():
    good = auth.hash_password("pw-123456")
    cfg = auth.load_config({"studio_auth": {"users": {
        "alice": {"password_hash": good, "role": "admin"},
        "bob": {"password_hash": good, "role": "superuser"},
        "local": {"password_hash": good, "role": "admin"},
        "eve": {"password_hash": "plaintext", "role": "user"},
    }}})
    assert list(cfg.users) == ["alice"] and cfg.configured and not cfg.oidc
    assert len(cfg.problems) == 3 and any("superuser" in p for p in cfg.problems)
    assert cfg.check("alice", "pw-123456").role == "admin"
    assert cfg.check("alice", "wrong") is None and cfg.check("nobody", "pw-123456") is None
    oidc = auth.load_config({"auth": {"redirect_uri": "x", "google": {"client_id": "c"}},
                             "studio_auth": {"roles": {"Alice@Example.org": "admin"}, "default_role": "viewer"}})
    assert oidc.oidc and oidc.configured and oidc.oidc_role("alice@example.org") == "admin"
    assert oidc.oidc_role("someone@else.org") == "viewer"
    assert not auth.load_config({}).configured


def test_hash_password_command_prints_a_working_secrets_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dashboard.auth", "hash-password", "--user", "carol", "--role",
                           "user", "--stdin"], input="s3cret-pass\n", capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import tomllib

    cfg = auth.load_config(tomllib.loads(proc.stdout))
    assert cfg.check("carol", "s3cret-pass").role == "user" and not cfg.problems
    bad = subprocess.run([sys.executable, "-m", "dashboard.auth", "hash-password", "--user", "local", "--stdin"],
                         input="s3cret-pass\n", capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2


def test_loopback_addresses():
    assert all(auth.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.1.2.3", "[::1]"))
    assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "::", "", None, "192.168.1.5", "myhost"))


# =============================================================================== launch off localhost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_refuses_the_network_without_credentials_and_serves_nothing(tmp_path):
    if (REPO / ".streamlit" / "secrets.toml").exists():
        pytest.skip("this checkout has its own .streamlit/secrets.toml (credentials configured)")
    port = _free_port()
    env = {**_clean_env(tmp_path), "HOME": str(tmp_path / "home"), "STUDIO_DEVICES": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.launch", "--host", "0.0.0.0", "--port", str(port),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert proc.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0" in proc.stderr
    assert "python -m dashboard.auth hash-password" in proc.stderr and ".streamlit/secrets.toml" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing started, not even a worker
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)  # no page data: nothing listens


def test_launch_allows_loopback_always_and_the_network_with_credentials(tmp_path, monkeypatch):
    from worker import launch

    secrets = tmp_path / "secrets.toml"
    monkeypatch.setattr(auth, "secrets_files", lambda: [secrets])
    assert launch.network_refusal("127.0.0.1") is None and launch.network_refusal("localhost") is None
    assert "without sign-in" in launch.network_refusal("0.0.0.0")
    secrets.write_text("[studio_auth.users.alice]\nrole = 'admin'\npassword_hash = 'broken'\n")
    assert "without sign-in" in launch.network_refusal("0.0.0.0")  # a malformed hash configures nobody
    secrets.write_text(f"[studio_auth.users.alice]\nrole = 'admin'\npassword_hash = '{auth.hash_password('x' * 9)}'\n")
    assert launch.network_refusal("0.0.0.0") is None
    secrets.write_text("[studio_auth\n")
    assert "cannot be read" in launch.network_refusal("0.0.0.0")


# =============================================================================== the dashboard's gate

PAGES = ("overview", "upload", "jobs", "results", "setup")


def _users() -> dict:
    h = {name: auth.hash_password(f"{name}-password") for name in ("ann", "vic", "ulf")}
    return {"studio_auth": {"users": {
        "ann": {"password_hash": h["ann"], "role": "admin"},
        "vic": {"password_hash": h["vic"], "role": "viewer"},
        "ulf": {"password_hash": h["ulf"], "role": "user"},
    }}}


def sign_in(at: AppTest, name: str, password: str | None = None) -> AppTest:
    at.text_input(key="signin_user").input(name)
    at.text_input(key="signin_password").input(password or f"{name}-password")
    next(b for b in at.button if b.label == "Sign in").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _no_page_data(at: AppTest, tmp: Path) -> None:
    text = everything(at)
    assert "talk_" not in text and str(tmp) not in text, text  # no job names, no paths
    assert not at.dataframe and not at.get("download_button") and not at.metric and not at.get("plotly_chart")
    assert not at.sidebar.button and not at.get("page_link")


@pytest.mark.parametrize("page", (None, *PAGES))
def test_network_without_credentials_shows_nothing_but_how_to_configure(studio, page):
    _, ids, tmp = studio
    with served_on("0.0.0.0"):
        at = deep_link(page, job=ids["succeeded"])
    _no_page_data(at, tmp)
    if page is None:  # a page's own script (a deep link) draws nothing at all
        assert any("served on the network without sign-in" in e.value and "hash-password" in e.value
                   for e in at.error)


@pytest.mark.parametrize("address", ("0.0.0.0", "127.0.0.1"))
@pytest.mark.parametrize("page", (None, *PAGES))
def test_with_credentials_an_unauthenticated_visitor_sees_only_the_sign_in_form(studio, address, page):
    _, ids, tmp = studio
    with served_on(address):
        at = deep_link(page, _users(), job=ids["succeeded"])
    _no_page_data(at, tmp)
    if page is None:  # a page's own script (a deep link) draws nothing at all
        assert [t.label for t in at.text_input] == ["User name", "Password"]
        assert [b.label for b in at.button] == ["Sign in"]
    else:
        assert not at.text_input or [t.label for t in at.text_input] == ["User name", "Password"]


def test_a_wrong_password_shows_nothing(studio):
    _, _, tmp = studio
    with served_on("0.0.0.0"):
        at = sign_in(visit(app(_users())), "ann", "guess")
        assert any("Wrong user name or password" in e.value for e in at.error)
        _no_page_data(at, tmp)
        at = sign_in(visit(app(_users())), "mallory", "ann-password")
        _no_page_data(at, tmp)


def _select(at: AppTest, job_ids: list[int]) -> AppTest:
    from dashboard.fmt import rows_key

    shown = list(at.dataframe[0].value["ID"])
    at.session_state[rows_key("jobs_table", shown)] = {
        "selection": {"rows": [shown.index(i) for i in job_ids], "columns": [], "cells": []}
    }
    return at.run()


def test_a_signed_in_viewer_sees_results_but_cannot_delete_even_past_the_ui(studio):
    reg, ids, _ = studio
    with served_on("0.0.0.0"):
        at = sign_in(visit(app(_users())), "vic")
        assert any("Signed in as **vic** (viewer)" in c.value for c in at.sidebar.caption)
        at.switch_page("pages/jobs.py").run()
        _select(at, [ids["failed"]])
        assert at.button(key="jobs_delete").disabled and at.button(key="jobs_retry").disabled
        # Past the UI: a forged confirmation reaches the service layer, which refuses.
        at.session_state["jobs_confirm_delete"] = [ids["failed"]]
        at.run()
        at.button(key="jobs_delete_yes").click().run()
        assert any("deleting jobs needs the admin role; vic is signed in as viewer" in w.value for w in at.warning)
        assert service.get_job(reg, ids["failed"]).status == JobStatus.FAILED  # still there

        at.switch_page("pages/results.py").run()
        assert at.title[0].value == "talk_done.mp4" and at.get("download_button")  # viewers may download
        at.switch_page("pages/upload.py").run()
        assert any("needs the user or admin role" in i.value for i in at.info) and not at.get("file_uploader")
        at.switch_page("pages/setup.py").run()
        assert any("Installing weight files needs the admin role" in i.value for i in at.info)
        assert not at.get("file_uploader")


def test_a_signed_in_admin_can_delete_and_signing_out_hides_everything_again(studio):
    reg, ids, tmp = studio
    with served_on("0.0.0.0"):
        at = sign_in(visit(app(_users())), "ann")
        at.switch_page("pages/jobs.py").run()
        _select(at, [ids["failed"]])
        at.button(key="jobs_delete").click().run()
        at.button(key="jobs_delete_yes").click().run()
        assert not any(j.id == ids["failed"] for j in service.list_jobs(reg, limit=50))
        at.sidebar.button(key="signout").click().run()
        _no_page_data(at, tmp)


def test_oidc_users_get_their_configured_role(studio):
    _, _, tmp = studio
    secrets = {"auth": {"redirect_uri": "http://x/oauth2callback", "cookie_secret": "s", "client_id": "c",
                        "client_secret": "d", "server_metadata_url": "http://x/.well-known"},
               "studio_auth": {"roles": {"ann@example.org": "admin"}, "default_role": None}}
    with served_on("0.0.0.0"):
        at = visit(app(secrets))
        assert [b.label for b in at.button] == ["Sign in with your organisation's account"]
        _no_page_data(at, tmp)
        at = visit(app(secrets, {"is_logged_in": True, "email": "ann@example.org"}))
        assert any("Signed in as **ann@example.org** (admin)" in c.value for c in at.sidebar.caption)
        at = visit(app(secrets, {"is_logged_in": True, "email": "eve@example.org"}))
        assert any("eve@example.org may not use this dashboard" in e.value for e in at.error)
        _no_page_data(at, tmp)


# =============================================================================== roles in the service layer


def test_service_layer_checks_roles_itself(tmp_path):
    reg = Registry(url=f"sqlite:///{tmp_path / 's.db'}", data_dir=tmp_path / "data")
    viewer, user, other = Actor("vic", "viewer"), Actor("ulf", "user"), Actor("uma", "user")
    admin = Actor("ann", "admin")
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"x" * 100)
    with pytest.raises(PermissionDenied, match="queueing videos needs the user role"):
        service.submit_file(reg, clip, SETTINGS, actor=viewer)
    mine = service.submit_file(reg, clip, SETTINGS, actor=user, original_name="mine.mp4")
    theirs = service.submit_file(reg, clip, SETTINGS, actor=other, original_name="theirs.mp4")
    assert mine.submitted_by == "ulf"
    with pytest.raises(PermissionDenied, match="cancelling other people's jobs needs the admin role"):
        service.cancel_job(reg, theirs.id, actor=user)
    with pytest.raises(PermissionDenied, match="cancelling other people's jobs needs the admin role"):
        service.cancel_job(reg, mine.id, actor=viewer)
    demoted = service.submit_file(reg, clip, SETTINGS, actor=Actor("vic", "user"))  # vic was a user then
    with pytest.raises(PermissionDenied, match="cancelling your own jobs needs the user role"):
        service.cancel_job(reg, demoted.id, actor=viewer)
    assert service.cancel_job(reg, mine.id, actor=user).status == JobStatus.CANCELLED
    with pytest.raises(PermissionDenied, match="retrying other people's jobs"):
        service.retry_job(reg, mine.id, actor=other)
    assert service.retry_job(reg, mine.id, actor=user).status == JobStatus.QUEUED
    for actor in (viewer, user):
        with pytest.raises(PermissionDenied, match="deleting jobs needs the admin role"):
            service.delete_job(reg, mine.id, actor=actor)
        with pytest.raises(PermissionDenied, match="importing folders on the server needs the admin role"):
            service.import_folder(reg, tmp_path, SETTINGS, actor=actor)
    assert service.get_job(reg, mine.id).status == JobStatus.QUEUED
    service.cancel_job(reg, theirs.id, actor=admin)
    service.delete_job(reg, theirs.id, actor=admin)
    with pytest.raises(Exception, match="no job"):
        service.get_job(reg, theirs.id)
    reg.close()


def test_installing_weights_needs_the_admin_role(tmp_path, monkeypatch):
    from dashboard.install import convert_face_model, install

    monkeypatch.setenv("STUDIO_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    src = tmp_path / "epoch_20.pth"
    src.write_bytes(b"not relevant")
    result = install("checkpoint", src, actor=Actor("ulf", "user"))
    assert not result.ok and "installing weight files needs the admin role" in result.message
    assert not (tmp_path / "checkpoints").exists()
    assert "needs the admin role" in convert_face_model(actor=Actor("vic", "viewer")).message


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_old_registries_are_migrated_to_record_who_submitted(tmp_path, request, backend):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    reg = Registry(url=url, data_dir=tmp_path / "data")
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"x" * 10)
    job = service.submit_file(reg, clip, SETTINGS)
    with reg.write() as s:  # make it a version-1 database
        s.connection().execute(text("ALTER TABLE jobs DROP COLUMN submitted_by"))
        s.connection().execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    reg.close()
    again = Registry(url=url, data_dir=tmp_path / "data")
    assert again.schema_version() == 2 and service.get_job(again, job.id).submitted_by is None
    assert service.submit_file(again, clip, SETTINGS, actor=Actor("ulf", "user")).submitted_by == "ulf"
    again.close()


# =============================================================================== allowed import roots


@pytest.fixture
def tree(tmp_path):
    """allowed/ (two clips, a link to a private file outside, a linked folder pointing outside), private/."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    make_clip(allowed / "set" / "a.mp4", n=2, size=(32, 32))
    make_clip(allowed / "set" / "b.mp4", n=2, size=(32, 32))
    make_clip(private / "secret.mp4", n=2, size=(32, 32))
    (allowed / "set" / "link.mp4").symlink_to(private / "secret.mp4")
    (allowed / "escape").symlink_to(private, target_is_directory=True)
    return allowed, private


def test_import_stays_under_the_allowed_roots(tmp_path, tree):
    allowed, private = tree
    reg = Registry(url=f"sqlite:///{tmp_path / 's.db'}", data_dir=tmp_path / "data")
    admin = Actor("ann", "admin", ImportPolicy(roots=(allowed.resolve(),)))
    jobs = service.import_folder(reg, allowed / "set", SETTINGS, actor=admin)
    assert sorted(j.name for j in jobs) == ["a.mp4", "b.mp4"]  # link.mp4 leads outside: skipped
    assert all(j.input_path.resolve().is_relative_to(allowed.resolve()) for j in jobs)
    for outside in (private, allowed / ".." / "private", allowed / "escape", Path("/etc")):
        with pytest.raises(PermissionDenied, match="outside the folders that may be imported"):
            service.import_folder(reg, outside, SETTINGS, actor=admin)
    closed = Actor("ann", "admin", ImportPolicy.from_env(network=True, environ={}))
    with pytest.raises(PermissionDenied, match=r"importing server folders is off.*STUDIO_IMPORT_ROOTS"):
        service.import_folder(reg, allowed, SETTINGS, actor=closed)
    assert len(service.list_jobs(reg, limit=50)) == 2
    reg.close()


def test_import_policy_from_the_environment(tmp_path):
    env = {"STUDIO_IMPORT_ROOTS": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b' / '..' / 'c'}"}
    policy = ImportPolicy.from_env(network=True, environ=env)
    assert policy.roots == ((tmp_path / "a").resolve(), (tmp_path / "c").resolve())
    assert policy.allows(tmp_path / "a" / "x.mp4") and not policy.allows(tmp_path / "b" / "x.mp4")
    assert ImportPolicy.from_env(network=False, environ={}).roots is None  # local: any folder
    assert ImportPolicy.from_env(network=True, environ={}).roots == ()


def test_the_frame_viewer_reads_only_the_data_folder_or_an_allowed_root(studio, tree, monkeypatch):
    reg, ids, _ = studio
    allowed, private = tree
    policy = ImportPolicy(roots=(allowed.resolve(),))
    actor = Actor("ann", "admin", policy)
    assert may_read(reg.uploads_dir / "x.mp4", reg.data_dir, actor)
    assert may_read(allowed / "set" / "a.mp4", reg.data_dir, actor)
    assert not may_read(allowed / "set" / "link.mp4", reg.data_dir, actor)  # resolves into private/
    assert not may_read(private / "secret.mp4", reg.data_dir, actor)

    # A job registered from the shell on a private file: the dashboard does not show its frames.
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary
    from engine.writers import write_outputs
    from tests.dashboard_fixtures import fake_result

    service.cancel_job(reg, ids["queued"], actor=LOCAL)  # so the claim below takes the new job
    job = service.submit_file(reg, private / "secret.mp4", SETTINGS, copy=False, original_name="secret.mp4")
    assert service.claim_next(reg, "w", device="cpu").id == job.id
    paths = write_outputs(fake_result(n=2, invalid=()), reg.result_dir(job.id) / "secret", ["npz"])
    files = [ArtifactFile(f, p, p.stat().st_size, sha256_file(p)) for f, p in paths.items()]
    service.complete_job(reg, job.id, "w", artifacts=files,
                         quality=QualitySummary(frames=2, valid_frames=2, reasons={}, longest_invalid_run=0))
    monkeypatch.setenv("STUDIO_IMPORT_ROOTS", str(allowed))
    at = app()
    at.query_params["job"] = str(job.id)
    visit(at, "results")
    assert any("lies outside the data folder and the allowed import roots" in w.value for w in at.warning)
    assert not at.get("image")


def test_upload_page_explains_why_folder_import_is_off(studio):
    with served_on("0.0.0.0"):
        at = sign_in(visit(app(_users())), "ann")
        at.switch_page("pages/upload.py").run()
    assert "Import a folder on the server" not in at.segmented_control(key="up_mode").options
    assert any("Importing server folders is off" in c.value and "STUDIO_IMPORT_ROOTS" in c.value for c in at.caption)


# =============================================================================== paths the UI shows


def test_paths_are_shown_relative_never_absolute(tmp_path):
    data = tmp_path / "data"
    assert display_path(data / "results" / "3" / "a.npz", data) == "results/3/a.npz"
    assert display_path(tmp_path / "ds" / "x" / "a.mp4", data, [tmp_path / "ds"]) == "ds/x/a.mp4"
    assert display_path(Path.home() / "w" / "e.pth", Path("/nonexistent")) == "~/w/e.pth"
    assert display_path("/opt/secret/place/e.pth", data) == "…/place/e.pth"
    text = relative_text(f"{data}/uploads/ab/cd.mp4: truncated; see https://example.org/a/b", data)
    assert text == "uploads/ab/cd.mp4: truncated; see https://example.org/a/b"


def test_the_ui_shows_no_absolute_server_path(studio):
    reg, ids, tmp = studio
    for page in PAGES:
        at = app()
        at.query_params["job"] = str(ids["succeeded"])
        visit(at, page)
        if page == "jobs":
            _select(at, [ids["failed"]])
            assert "uploads/" in str(at.table[0].value)  # the input, relative to the data folder
        body = everything(at)
        assert str(tmp) not in body and str(reg.data_dir) not in body, (page, body)


# =============================================================================== a real server, over its websocket


def _page_texts(port: int, page: str, query: str = "") -> str:
    """What a browser receives for ``/page?query`` from a running dashboard: every message of one
    script run, as JSON (what a client could ever see, widgets and tables included)."""
    import asyncio

    import websockets
    from google.protobuf.json_format import MessageToJson
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async def talk() -> str:
        seen = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"],
                                      max_size=None) as ws:
            msg = BackMsg()
            msg.rerun_script.query_string, msg.rerun_script.page_name = query, page
            await ws.send(msg.SerializeToString())
            while True:
                fm = ForwardMsg()
                fm.ParseFromString(await asyncio.wait_for(ws.recv(), timeout=60))
                seen.append(MessageToJson(fm))
                if fm.HasField("script_finished"):
                    return "\n".join(seen)

    return asyncio.run(talk())


@contextmanager
def _dashboard(tmp: Path, address: str, secrets: Path):
    """``streamlit run streamlit_app.py`` on ``address``, reading only the secrets file ``secrets``."""
    port = _free_port()
    env = {**_clean_env(tmp), "HOME": str(tmp / "home")}
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", address, "--server.port",
           str(port), "--server.headless", "true", "--secrets.files", str(secrets)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # up to 60 s to come up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "the dashboard exited"
                threading.Event().wait(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_real_dashboard_sends_no_page_data_off_localhost_before_sign_in(studio):
    """Over the wire: bound to 0.0.0.0, without credentials and with them (not signed in), the
    jobs and results pages send nothing of the registry; on 127.0.0.1 the same probe sees it."""
    _, ids, tmp = studio
    secrets = tmp / "secrets.toml"
    query = f"job={ids['succeeded']}"
    with _dashboard(tmp, "127.0.0.1", secrets) as port:  # control: the probe does see page data
        assert "page 1 of 1" in _page_texts(port, "jobs")  # "Jobs 1–5 of 5 · page 1 of 1"
        assert "talk_done.mp4" in _page_texts(port, "results", query)
    with _dashboard(tmp, "0.0.0.0", secrets) as port:
        for page in ("", "jobs", "results", "upload", "setup"):
            body = _page_texts(port, page, query)
            assert "talk_" not in body and "page 1 of" not in body and str(tmp) not in body, page
            assert "served on the network without sign-in" in body
    user = auth.hash_password("ann-password")
    secrets.write_text(f"[studio_auth.users.ann]\nrole = 'admin'\npassword_hash = '{user}'\n")
    with _dashboard(tmp, "0.0.0.0", secrets) as port:
        for page in ("", "jobs", "results"):
            body = _page_texts(port, page, query)
            assert "talk_" not in body and "page 1 of" not in body and str(tmp) not in body, page
            assert '"label": "Password"' in body and "Sign in" in body
