"""bench/spy_summary.py on collapsed stacks written here, and bench.throughput.py_spy's py-spy
commands, with a stand-in py-spy that records its arguments (the real one is not installed)."""

from __future__ import annotations

import stat
import sys
import textwrap
import time

import pytest

from bench import spy_summary
from bench.throughput import py_spy

W = 'process 101:"python -m engine worker --device cuda:0 --slot 1"'
L = 'process 100:"python -m engine worker --gpus all"'
RAW = "\n".join([
    f"{L};{W};thread (7): engine;serve (worker/loop.py:700);run (engine/many.py:20);"
    "synchronize (torch/cuda/__init__.py:9) 30",
    f"{L};{W};thread (7): engine;serve (worker/loop.py:700);fit_batch (engine/align.py:120) 6",
    f"{L};{W};thread (7): engine;serve (worker/loop.py:700);execute (sqlalchemy/engine/base.py:3) 4",
    f"{L};{W};thread (8): Thread-12 (produce);produce (engine/sources.py:50);decode (engine/stages/nvdec.py:80) 15",
    f"{L};{W};thread (9): Thread-31 (produce);produce (engine/sources.py:50);Condition.wait (threading.py:327) 5",
    'process 5:"python -m streamlit run streamlit_app.py";thread (2): MainThread;select (selectors.py:1) 40',
    "not a stack line",
])


def test_samples_are_grouped_by_thread_kind_with_their_leaves_and_project_functions():
    total, kinds = spy_summary.summarize(RAW.splitlines(), match="engine worker")
    assert total == 60  # the dashboard's 40 samples are not a worker's
    assert set(kinds) == {"engine", "Thread-N (produce)"}
    engine, decode = kinds["engine"], kinds["Thread-N (produce)"]
    assert engine.samples == 40 and decode.samples == 20
    assert engine.leaves == {"synchronize (torch/cuda/__init__.py)": 30, "fit_batch (engine/align.py)": 6,
                             "execute (sqlalchemy/engine/base.py)": 4}
    assert engine.own["serve (worker/loop.py)"] == 40 and engine.own["run (engine/many.py)"] == 30
    assert "execute (sqlalchemy/engine/base.py)" not in engine.own  # a library's engine/, not this project's
    assert decode.leaves["Condition.wait (threading.py)"] == 5
    text = spy_summary.report(total, kinds, top=2)
    assert text.splitlines()[0] == "60 samples"
    assert "engine: 40 samples, 66.7 % of all" in text and " 75.0 %  at   synchronize (torch/cuda/__init__.py)" in text


def test_without_match_every_process_counts_and_no_samples_says_why(tmp_path, capsys):
    total, kinds = spy_summary.summarize(RAW.splitlines())
    assert total == 100 and kinds["MainThread"].samples == 40
    assert spy_summary.report(*spy_summary.summarize(RAW.splitlines(), match="nothing")).startswith("no samples")
    f = tmp_path / "run.threads.txt"
    f.write_text(RAW + "\n")
    assert spy_summary.main([str(f), "--match", "engine worker", "--top", "1"]) == 0
    assert "engine: 40 samples" in capsys.readouterr().out


@pytest.fixture
def fake_py_spy(tmp_path, monkeypatch):
    """A ``py-spy`` beside the interpreter (where ``py_spy`` looks first) that writes its arguments to
    its ``--output`` file and waits for SIGINT."""
    folder = tmp_path / "bin"
    folder.mkdir()
    exe = folder / "py-spy"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import signal, sys, time
        args = sys.argv[1:]
        out = args[args.index("--output") + 1]
        def stop(*_):
            open(out, "w").write(" ".join(args))
            sys.exit(0)
        signal.signal(signal.SIGINT, stop)
        open(out + ".ready", "w").close()
        while True:
            time.sleep(0.05)
        """))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(folder / "python"))
    return exe


def _wait_started(output) -> None:
    """Wait (60 s at most) until the stand-in writing ``output`` has set its SIGINT handler."""
    ready = output.with_name(output.name + ".ready")
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()


def test_py_spy_records_one_file_per_view_of_the_given_process(tmp_path, fake_py_spy):
    out = tmp_path / "spy"
    with py_spy(out, "fast-mtcnn-one", pid=4242, views=("gil", "threads")):
        for view in ("gil", "threads"):
            _wait_started(out / f"fast-mtcnn-one.{view}.txt")
    gil = (out / "fast-mtcnn-one.gil.txt").read_text().split()
    threads = (out / "fast-mtcnn-one.threads.txt").read_text().split()
    for args in (gil, threads):
        assert args[:3] == ["record", "--pid", "4242"] and "--subprocesses" in args and "--nonblocking" in args
    assert "--gil" in gil and "--threads" in gil and "--idle" not in gil  # the GIL holder, named
    assert "--threads" in threads and "--idle" in threads and "--gil" not in threads


def test_the_cpu_view_samples_running_threads_with_native_frames_pausing_the_process(tmp_path, fake_py_spy):
    out = tmp_path / "spy"
    with py_spy(out, "exact-mtcnn-all", pid=4243, views=("cpu",)):
        _wait_started(out / "exact-mtcnn-all.cpu.txt")
    args = (out / "exact-mtcnn-all.cpu.txt").read_text().split()
    assert args[:3] == ["record", "--pid", "4243"] and "--subprocesses" in args
    assert "--native" in args and "--threads" in args
    assert "--nonblocking" not in args and "--idle" not in args  # py-spy refuses native stacks without pausing


def test_native_samples_are_also_summed_by_the_library_they_were_in():
    raw = "\n".join([
        f"{L};{W};thread (8): Thread-12 (produce);produce (engine/sources.py:50);decode_slice (libavcodec.so.61) 6",
        f"{L};{W};thread (8): Thread-12 (produce);produce (engine/sources.py:50);0x7f12 (libc.so.6) 3",
        f"{L};{W};thread (8): Thread-12 (produce);produce (engine/sources.py:50);_convert (engine/sources.py:9) 1",
    ])
    total, kinds = spy_summary.summarize(raw.splitlines())
    produce = kinds["Thread-N (produce)"]
    assert produce.libraries == {"libavcodec": 6, "libc": 3, "Python": 1}
    text = spy_summary.report(total, kinds)
    assert " 60.0 %  in   libavcodec" in text and " 10.0 %  in   Python" in text
    assert "  in   " not in spy_summary.report(*spy_summary.summarize(RAW.splitlines()))  # no native frames


def test_py_spy_without_a_folder_or_without_py_spy_does_nothing(tmp_path, monkeypatch, caplog):
    with py_spy(None, "x"):
        pass
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "path", [])
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with py_spy(tmp_path / "spy", "x"):
        pass
    assert "py-spy is not installed" in caplog.text and not (tmp_path / "spy").exists()
