"""End to end in a real headless browser: ``make run`` equivalent → upload → succeeded → results → bundle.

Starts ``python -m worker.launch`` (one CPU worker + the dashboard) on a free port with a temporary
data folder and a random-weight checkpoint, drives Debian's Chromium with Playwright (never a
downloaded browser), and saves a screenshot of every page under ``test-output/screenshots/``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("STUDIO_TEST_OUTPUT", REPO / "test-output")) / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: The whole 200-frame clip on 2 CPU cores with MTCNN takes a minute or two.
JOB_TIMEOUT_S = 420
WIDTH = 1600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _settle(page, timeout: float = 90) -> None:
    """Wait until the app's script run has finished: Streamlit's own ``data-test-script-state``
    says ``notRunning`` and no spinner or 'Running…' widget shows, both for a whole second (a rerun
    that an action asks for can start a moment after it). Raises TimeoutError after ``timeout``."""
    idle = ('[data-testid="stApp"][data-test-script-state="notRunning"]'
            '[data-test-connection-state="CONNECTED"]')
    busy = '[data-testid="stSpinner"], [data-testid="stStatusWidget"]'
    deadline, quiet_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if page.locator(idle).count() == 1 and page.locator(busy).count() == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 1.0:
                return
        else:
            quiet_since = None
        time.sleep(0.1)
    raise TimeoutError(f"the app was still running after {timeout:.0f} s")


_HEIGHT_JS = """() => Math.max(...['[data-testid=stMain]', '[data-testid=stMainBlockContainer]',
  '[data-testid=stAppViewContainer]'].map(s => document.querySelector(s)).filter(Boolean)
  .map(e => e.scrollHeight), document.documentElement.scrollHeight)"""


def _shot(page, name: str) -> Path:
    """Screenshot the whole page: the viewport grows to the content's height first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = 0
    for _ in range(5):
        new = int(page.evaluate(_HEIGHT_JS))
        if new == height:
            break
        height = new
        page.set_viewport_size({"width": WIDTH, "height": max(700, height + 40)})
        time.sleep(1.0)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    return path


def _click_point(chart, where: float) -> None:
    """Click (once, no drag) the marker of the first trace at fraction ``where`` of its points."""
    points = chart.locator(".scatterlayer .trace").first.locator(".point")
    point = points.nth(int((points.count() - 1) * where))
    point.scroll_into_view_if_needed()  # a mouse click outside the viewport reaches nothing
    box = point.bounding_box()
    chart.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def _line_segments(chart) -> int:
    """How many separate pieces the first trace's line is drawn in (SVG move-to commands)."""
    paths = chart.locator(".scatterlayer .trace").first.locator("path.js-line")
    return sum(d.count("M") for d in paths.evaluate_all("els => els.map(e => e.getAttribute('d') || '')"))


@pytest.fixture
def studio_run(tmp_path):
    """``make run`` with a temporary data folder and checkpoint; stopped (and checked) afterwards."""
    pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run browser tests")
    from tests.factories import make_checkpoint

    make_checkpoint(tmp_path / "checkpoints" / "epoch_20.pth", "deep3d")
    from tests.conftest import BFM_INDEX

    if BFM_INDEX.is_dir():  # a made-up face model with the real topology: overlays and lm68 get exercised
        from engine.face3d.synthetic import write_synthetic_model

        write_synthetic_model(BFM_INDEX, tmp_path / "BFM")
    port = _free_port()
    env = dict(
        os.environ,
        STUDIO_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        STUDIO_BFM_DIR=str(tmp_path / "BFM"),
        TORCH_HOME=str(tmp_path / "torch"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("STUDIO_DB_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "worker.launch",
        "--devices",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    log = open(tmp_path / "launch.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", 90)
        yield {"port": port, "data": tmp_path / "data", "tmp": tmp_path, "cmd": cmd, "env": env}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C / `kill` of `make run` does
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    print((tmp_path / "launch.log").read_text()[-3000:])
    assert not _port_open(port), "the dashboard kept running after the launcher stopped"


@pytest.mark.timeout(1800)  # its waits add up to more than the suite's 600 s
def test_upload_to_bundle_in_a_real_browser(studio_run, test_video):
    from playwright.sync_api import expect, sync_playwright

    from db import JobStatus, Registry, service

    port, data = studio_run["port"], studio_run["data"]
    base = f"http://127.0.0.1:{port}"

    # A second `make run` on the same data folder starts no second worker for the same device.
    second = subprocess.run(
        studio_run["cmd"], cwd=REPO, env=studio_run["env"], capture_output=True, text=True, timeout=120
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "already serves cpu" in out and "dashboard already runs" in out, out

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(60_000)

        # First request of a fresh server is a deep link: it must get the app's own navigation
        # (Streamlit's file-based pages/ mode would serve the bare script; see dashboard/navigation.py).
        page.goto(base + "/setup")
        expect(page.get_by_role("heading", name="Models / setup")).to_be_visible()
        expect(page.get_by_test_id("stSidebarNav").get_by_text("Models / setup")).to_be_visible()
        _settle(page)
        _shot(page, "05-setup")

        page.goto(base + "/")
        expect(page.get_by_text("Ready to run?")).to_be_visible()
        expect(page.get_by_text("alive")).to_be_visible(timeout=60_000)  # the worker's heartbeat
        _settle(page)
        _shot(page, "01-overview")

        page.goto(base + "/upload")
        page.locator('input[type="file"]').first.set_input_files(str(test_video))
        expect(page.get_by_role("button", name=f"Remove {test_video.name}")).to_be_visible()
        page.get_by_text("MTCNN (5 points)").click()
        page.get_by_role("button", name="CSV").click()  # a third format on top of the defaults
        _settle(page)
        _shot(page, "02-upload")
        page.get_by_role("button", name="Queue 1 file(s)").click()
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()

        reg = Registry(data_dir=data)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        job = service.list_jobs(reg, limit=1)[0]
        running_shot = False
        while job.status in (JobStatus.QUEUED, JobStatus.RUNNING) and time.monotonic() < deadline:
            if job.status == JobStatus.RUNNING and job.frames_done > 0 and not running_shot:
                time.sleep(2.5)  # one live refresh of the table
                _shot(page, "03-jobs-running")
                running_shot = True
            time.sleep(2)
            job = service.get_job(reg, job.id)
        assert job.status == JobStatus.SUCCEEDED, f"job ended {job.status.value}: {job.error}"
        assert job.settings["landmarks"] == "mtcnn" and "csv" in job.settings["formats"]
        time.sleep(3)  # the live table picks the new state up
        _shot(page, "03-jobs")

        page.goto(f"{base}/results?job={job.id}")
        pose = page.locator(".js-plotly-plot").first
        expect(pose).to_contain_text("Head pose")
        expect(pose).to_contain_text("rotation (degrees)")
        expect(pose).to_contain_text("time (s)")
        _settle(page)

        # A single click on a point of the pose chart: the frame viewer jumps to that frame.
        expect(page.get_by_text("Frame 0 · t = 0.000 s")).to_be_visible()
        _click_point(pose, 0.5)
        expect(page.get_by_text("Frame 0 · t = 0.000 s")).to_have_count(0, timeout=30_000)
        expect(page.get_by_text(re.compile(r"^Frame [1-9]\d* · t = "))).to_be_visible()
        _settle(page)
        if (studio_run["tmp"] / "BFM" / "BFM_model_front.mat").is_file():
            page.get_by_text("Show reconstructed face").click()
            expect(page.get_by_text("Reconstructed face over the frame")).to_be_visible(timeout=120_000)
            _settle(page)
        _shot(page, "04-results")

        with page.expect_download(timeout=120_000) as info:
            page.get_by_role("button", name="Download bundle (.zip)").click()
        bundle = studio_run["tmp"] / "bundle.zip"
        info.value.save_as(bundle)
        browser.close()

    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        stem = Path(test_video.name).stem
        assert {"manifest.json", "README.txt", f"{stem}.mat", f"{stem}.npz", f"{stem}.csv"} <= names
        assert manifest["input"]["name"] == test_video.name
        assert manifest["frames"] == 200 and manifest["settings"]["landmarks"] == "mtcnn"
        assert {f["name"] for f in manifest["files"]} == {f"{stem}.mat", f"{stem}.npz", f"{stem}.csv"}
        import scipy.io

        mat = scipy.io.loadmat(io.BytesIO(zf.read(f"{stem}.mat")))
        assert mat["coeff"].shape == (200, 257) and mat["coeff"].dtype == np.float32
        assert mat["transform_params"].shape == (200, 5)
        npz = np.load(io.BytesIO(zf.read(f"{stem}.npz")))
        assert npz["landmarks"].shape == (200, 5, 2) and npz["valid"].shape == (200,)


#: Viewport sizes of the screenshots in docs/screenshots/ (width, height).
SIZES = ((1280, 800), (1920, 1080))


def _shots(page, name: str) -> None:
    """Screenshots of what a visitor sees at each of :data:`SIZES` (viewport, not the full page)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for w, h in SIZES:
        page.set_viewport_size({"width": w, "height": h})
        time.sleep(1.5)
        _settle(page)
        page.screenshot(path=str(SHOTS / f"{name}-{w}x{h}.png"))
    page.set_viewport_size({"width": WIDTH, "height": 1000})


def test_dataset_compare_click_and_retry_in_a_real_browser(studio_run):
    """Demo jobs (no checkpoint involved) in the dataset view: a filter and its CSV export, three
    videos compared, a click that selects a frame, wrapped angles, an error carrying the uploaded
    name, and Retry with another landmark backend; screenshots of every page at two sizes."""
    from playwright.sync_api import expect, sync_playwright

    from dashboard.demo import make_demo_jobs
    from db import JobStatus, Registry, service

    port, data = studio_run["port"], studio_run["data"]
    base = f"http://127.0.0.1:{port}"
    reg = Registry(data_dir=data)
    ids = make_demo_jobs(reg, 22, frames=100)
    # A failed job as the worker words it: the engine's message names the stored upload, the
    # registry's copy names it by the uploaded name (db.access.user_message, used by the worker).
    from db.access import user_message
    from tests.dashboard_fixtures import make_clip

    clip = make_clip(studio_run["tmp"] / "upload.mp4", n=10, size=(64, 48))
    bad = service.submit_file(reg, clip, {"landmarks": "mtcnn", "formats": ["npz"], "device": "cuda:97"},
                              original_name="Interview 2024.mp4")  # a device no worker here has
    service.register_worker(reg, "stand-in", hostname="test", pid=1, device="cuda:97")
    service.claim_job(reg, bad.id, "stand-in", device="cuda:97")
    message = user_message(f"{bad.input_path}: no face found in any of 10 frames", bad.input_path, bad.name, data)
    service.fail_job(reg, bad.id, "stand-in", error=message, code="no_face")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(60_000)

        # Dataset view: every demo job, a filter, its export.
        page.goto(base + "/dataset")
        expect(page.get_by_text("22 of 22 finished jobs")).to_be_visible()
        expect(page.get_by_text("Compare videos")).to_be_visible()
        _settle(page)
        compare = page.locator(".js-plotly-plot").nth(1)
        for j in ids[-3:]:  # newest first: the last three made are compared by default
            expect(compare).to_contain_text(f"(job {j})")
        _shots(page, "06-dataset")
        page.get_by_role("textbox", name="Filter").fill("valid < 95 %")
        page.get_by_role("textbox", name="Filter").press("Enter")
        expect(page.get_by_text(re.compile(r"^\d+ of 22 finished jobs"))).to_be_visible()
        expect(page.get_by_text("22 of 22 finished jobs")).to_have_count(0)
        _settle(page)
        with page.expect_download(timeout=60_000) as info:
            page.get_by_role("button", name=re.compile(r"Export these \d+ jobs")).click()
        csv_path = studio_run["tmp"] / "dataset.csv"
        info.value.save_as(csv_path)
        import pandas as pd

        table = pd.read_csv(csv_path)
        assert 0 < len(table) < 22 and (table["valid_pct"] < 95).all()
        assert not table["input"].str.startswith("/").any() and not table["result"].str.startswith("/").any()
        assert table["result"].str.startswith("results/").all()

        # Results of a demo video whose stored yaw is a full turn off: every angle shown is wrapped.
        page.goto(f"{base}/results?job={ids[0]}")
        pose = page.locator(".js-plotly-plot").first
        expect(pose).to_contain_text("Head pose")
        expect(page.get_by_text("demo", exact=True).first).to_be_visible()
        _settle(page)
        expect(page.get_by_text("Frame 0 · t = 0.000 s")).to_be_visible()
        _click_point(pose, 0.6)  # one click, no drag
        caption = page.get_by_text(re.compile(r"^Frame [1-9]\d* · t = "))
        expect(caption).to_be_visible(timeout=30_000)
        yaw = float(re.search(r"yaw (-?\d+\.\d)°", caption.inner_text()).group(1))
        assert -180 <= yaw <= 180 and abs(yaw) < 90, caption.inner_text()
        ticks = pose.locator(".ytick text").all_text_contents()
        assert ticks and all(abs(float(t.replace("−", "-"))) <= 180 for t in ticks), ticks
        assert _line_segments(pose) == 1  # a face in every frame: one unbroken line
        _shots(page, "04-results")

        # A video with a stretch of frames without a face (demo seed 3): the lines break there
        # (the filler values are not drawn) and the grey band says why.
        page.goto(f"{base}/results?job={ids[3]}")
        pose = page.locator(".js-plotly-plot").first
        expect(pose).to_contain_text("no face / invalid frame")
        _settle(page)
        assert _line_segments(pose) >= 2, "the line runs through the frames without a face"

        # Jobs: the failed upload is named as uploaded; Retry with another backend.
        page.goto(base + "/jobs")
        expect(page.get_by_text("Interview 2024.mp4").first).to_be_attached()  # a grid cell (drawn on a canvas)
        page.get_by_text("Live updates").click()  # hold the table still while acting on it
        _settle(page)
        _shots(page, "03-jobs")
        page.get_by_role("textbox", name="Search").fill("Interview")
        page.get_by_role("textbox", name="Search").press("Enter")
        expect(page.get_by_text(re.compile(r"^Jobs 1–1 of 1"))).to_be_visible()
        _settle(page)
        grid = page.get_by_test_id("stDataFrame").first.bounding_box()
        page.mouse.click(grid["x"] + 16, grid["y"] + 35 + 17)  # the tick box of the only row
        alert = page.get_by_test_id("stAlert").filter(has_text="Interview 2024.mp4: no face found")
        expect(alert).to_be_visible()  # the selected job's error, named as uploaded
        expect(alert).not_to_contain_text(bad.video.sha256[:12])  # never the content hash
        page.get_by_test_id("stRadio").filter(has_text="Landmark backend for the retry").get_by_text(
            "FAN (68 points)").click()
        _settle(page)
        page.get_by_role("button", name="Retry with these settings").click()
        expect(page.get_by_text(re.compile("Queued again with landmarks=fan"))).to_be_visible()
        retried = service.get_job(reg, bad.id)
        assert retried.settings["landmarks"] == "fan" and retried.status == JobStatus.QUEUED

        for path, name in (("/", "01-overview"), ("/upload", "02-upload"), ("/setup", "05-setup")):
            page.goto(base + path)
            _settle(page)
            _shots(page, name)
        browser.close()
