"""The CLI's contract: flags, defaults, doctor, messages."""

from __future__ import annotations

import pytest

from engine.cli import build_parser, config_from_args
from engine.config import DEFAULT_FORMATS, LandmarkBackend
from engine.doctor import format_report, run_checks


def test_extract_defaults():
    args = build_parser().parse_args(["extract", "a.mp4", "-o", "out"])
    cfg = config_from_args(args)
    assert cfg.formats == DEFAULT_FORMATS and cfg.landmarks == LandmarkBackend.FAN
    assert cfg.checkpoint is None and not cfg.overwrite


def test_unknown_format_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "a.mp4", "-o", "out", "--formats", "pirender,gif"])
    assert "known formats" in capsys.readouterr().err


def test_doctor_names_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CHECKPOINT_DIR", str(tmp_path))
    checks = run_checks()
    net = next(c for c in checks if c.name == "reconstruction net")
    assert not net.ok and "epoch_20.pth" in net.fix and str(tmp_path) in net.detail
    report = format_report(checks)
    assert "not ready" in report and "reconstruction net" in report
    nvdec = next(c for c in checks if c.name == "NVDEC (optional)")
    assert not nvdec.required  # an optional extra never makes the report "not ready"
    assert nvdec.ok or "pip install pynvvideocodec" in nvdec.fix


def test_doctor_accepts_a_valid_checkpoint(tmp_path, monkeypatch, recon_checkpoint):
    monkeypatch.setenv("STUDIO_CHECKPOINT_DIR", str(recon_checkpoint.parent))
    net = next(c for c in run_checks() if c.name == "reconstruction net")
    assert net.ok, net
    assert {c.name for c in run_checks() if c.group == "landmarks"} >= {"fan", "mtcnn", "file"}


def test_missing_input_exits_2(tmp_path):
    from engine.cli import main

    assert main(["extract", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "out")]) == 2
