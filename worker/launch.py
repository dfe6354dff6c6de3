"""``python -m worker.launch``: K workers per visible GPU (or K CPU workers) plus the dashboard.

Used by ``make run``. ``--per-gpu K`` (or ``$STUDIO_PER_GPU``; default :data:`DEFAULT_PER_GPU`)
worker processes share each device, each in its own interpreter (own GIL, own CUDA context),
because one worker process is bound by its Python per-frame work long before the GPU is busy.
Each worker is started in a slot ``0..K-1`` of its device, under an exclusive ``fcntl`` lock on
``<data>/locks/worker-<device>[-<slot>].lock`` that its process inherits, so a second launch on
the same machine and data folder does not serve a slot twice: it starts only the slots that are
free (and says which are already served), the dashboard, or says that it already runs on that port.

Children are started with ``subprocess`` (a fresh interpreter each, never a fork of a
process that initialised CUDA), in their own session, so Ctrl-C reaches only this
launcher, which then asks each child once to stop (SIGTERM: workers finish their batch
and requeue their job). A worker that dies is restarted after a short pause.

The dashboard is only served on a non-loopback address (``--host 0.0.0.0``) when sign-in is
configured (:mod:`dashboard.auth`); otherwise the launch is refused before anything starts.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("worker.launch")

REPO = Path(__file__).resolve().parents[1]
RESTART_DELAY_S = 5.0
STOP_GRACE_S = 60.0


#: Comma list of devices that replaces GPU detection (e.g. ``cuda:1,cuda:2``; tests use ``cpu:0,cpu:1``).
DEVICES_ENV = "STUDIO_DEVICES"
#: ``--per-gpu auto``: :func:`auto_per_gpu` picks the count from the GPUs and the CPU cores.
AUTO = "auto"
#: Worker processes per device when neither ``--per-gpu`` nor :data:`PER_GPU_ENV` says otherwise.
DEFAULT_PER_GPU = AUTO

#: Environment variable with the default of ``--per-gpu`` (``make run PER_GPU=K`` passes ``--per-gpu K``).
PER_GPU_ENV = "STUDIO_PER_GPU"


def parse_per_gpu(text: str | int) -> int | str:
    """``--per-gpu`` as a count of worker processes per device (1 or more), or :data:`AUTO`.

    Raises:
        ValueError: neither ``auto`` nor a whole number of at least 1.

    >>> parse_per_gpu("3"), parse_per_gpu(1), parse_per_gpu(" Auto ")
    (3, 1, 'auto')
    """
    value = str(text).strip()
    if value.lower() == AUTO:
        return AUTO
    if not value.isdigit() or int(value) < 1:
        raise ValueError("--per-gpu: expected 'auto' or a whole number of worker processes per device (1 or more), "
                         f"got {text!r}")
    return int(value)


def auto_per_gpu(devices: list[str], cores: int | None = None, gpu_gib: float | None = None) -> int:
    """Worker processes per device for ``--per-gpu auto``: on GPUs,
    :func:`engine.procs.processes_per_gpu` of each GPU's share of ``cores`` (default
    :func:`usable_cores`: one per 4 cores, 1 to 4, as ``extract --processes auto``) and of the
    smallest GPU's memory ``gpu_gib`` (None: not counted); on CPU devices 1 (a CPU worker
    already uses every core it is given).

    >>> auto_per_gpu(["cuda:0"], 16), auto_per_gpu(["cuda:0", "cuda:1"], 32), auto_per_gpu(["cuda:0"], 6)
    (4, 4, 1)
    >>> auto_per_gpu(["cuda:0"], 128), auto_per_gpu(["cpu"], 64), auto_per_gpu(["cuda:0"], 16, 23.6)
    (4, 1, 3)
    """
    if not devices or not all(str(d).startswith("cuda") for d in devices):
        return 1
    from engine.procs import processes_per_gpu

    return processes_per_gpu((cores or usable_cores()) // len(devices), gpu_gib)


def smallest_gpu_gib(devices: list[str]) -> float | None:
    """Total memory (GiB) of the smallest of the CUDA ``devices``, asked in a child interpreter
    (this process never initialises CUDA); None for CPU devices or when it cannot be told."""
    from engine.config import cuda_index

    indices = [cuda_index(d) for d in devices if str(d).startswith("cuda")]
    if not indices or len(indices) != len(devices):
        return None
    code = ("import sys, torch; print(min(torch.cuda.get_device_properties(int(i)).total_memory "
            "for i in sys.argv[1:]) / 2**30)")
    try:
        out = subprocess.run([sys.executable, "-c", code, *map(str, indices)], capture_output=True, text=True,
                             timeout=120)
        return float(out.stdout.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        log.warning("could not read the GPUs' memory (%s): --per-gpu auto counts CPU cores only", e)
        return None


def resolve_per_gpu(per_gpu: int | str, devices: list[str], cores: int | None = None,
                    gpu_gib: float | None = None) -> int:
    """``per_gpu`` (a count, or ``auto``: :func:`auto_per_gpu` over ``devices``, ``cores`` and
    ``gpu_gib``) as a count.

    >>> resolve_per_gpu("2", ["cuda:0"]), resolve_per_gpu("auto", ["cuda:0"], 8)
    (2, 2)
    """
    value = parse_per_gpu(per_gpu)
    return auto_per_gpu(list(dict.fromkeys(devices)), cores, gpu_gib) if value == AUTO else int(value)


def default_per_gpu(env: dict[str, str] | None = None) -> int | str:
    """``$STUDIO_PER_GPU`` when set, else :data:`DEFAULT_PER_GPU`.

    Raises:
        ValueError: the variable is set but not a count of 1 or more.
    """
    value = (os.environ if env is None else env).get(PER_GPU_ENV, "").strip()
    if not value:
        return DEFAULT_PER_GPU
    try:
        return parse_per_gpu(value)
    except ValueError:
        raise ValueError(f"${PER_GPU_ENV}: expected 'auto' or a whole number of 1 or more, got {value!r}") from None


def visible_devices() -> list[str]:
    """``["cuda:0", ...]`` for every GPU torch sees, else ``["cpu"]``; ``$STUDIO_DEVICES`` overrides both.

    Asked in a child interpreter so this process never initialises CUDA.
    """
    override = [d.strip() for d in os.environ.get(DEVICES_ENV, "").split(",") if d.strip()]
    if override:
        return override
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        count = int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        log.warning("could not count GPUs (%s): using the CPU", e)
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def lock_path(locks_dir: Path, device: str, slot: int = 0) -> Path:
    """``worker-cuda0.lock`` for slot 0 (the name of a launch of one worker per device), ``worker-cuda0-<slot>.lock``
    for the others.

    >>> lock_path(Path("locks"), "cuda:1", 2).name, lock_path(Path("locks"), "cpu").name
    ('worker-cuda1-2.lock', 'worker-cpu.lock')
    """
    name = device.replace(":", "") + (f"-{slot}" if slot else "")
    return locks_dir / f"worker-{name}.lock"


def slot_label(device: str, slot: int, per_gpu: int) -> str:
    """How a worker slot is named in notes and logs: ``cuda:0`` when one worker serves each device, else
    ``cuda:0 #1`` (the same ``#slot`` ends the worker's id, see :func:`worker.loop.default_worker_id`).

    >>> slot_label("cuda:0", 0, 1), slot_label("cuda:0", 1, 2)
    ('cuda:0', 'cuda:0 #1')
    """
    return device if per_gpu == 1 else f"{device} #{slot}"


def lock_device(locks_dir: Path, device: str, slot: int = 0) -> int | None:
    """Take the exclusive lock of ``slot`` of ``device``; the open file descriptor, or None if held elsewhere."""
    locks_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(locks_dir, device, slot)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def port_in_use(host: str, port: int) -> bool:
    """True when something already accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Child:
    """A supervised child process."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    restart: bool = True
    once: bool = False  #: a clean exit (code 0: burst, max jobs) ends it instead of restarting it
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    finished: bool = False
    cores: tuple[int, ...] = ()  #: CPUs the child is pinned to (empty: not pinned)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, pass_fds=self.pass_fds,
                                     start_new_session=True)
        self.started_at = time.monotonic()
        if self.cores:  # before the child starts its threads: they, and FFmpeg's thread count, inherit it
            try:
                os.sched_setaffinity(self.proc.pid, self.cores)
            except OSError as e:
                log.warning("could not pin %s to CPUs %s: %s", self.name, _ranges(self.cores), e)
        pinned = f" on CPUs {_ranges(self.cores)}" if self.cores else ""
        log.info("started %s (pid %d)%s: %s", self.name, self.proc.pid, pinned, " ".join(self.cmd))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def build_children(args: argparse.Namespace) -> tuple[list[Child], list[str]]:
    """The children to start, and the messages about what is already running."""
    env = dict(os.environ)
    data_dir = Path(args.data_dir).expanduser().resolve()
    env["STUDIO_DATA_DIR"] = str(data_dir)
    if args.db_url:
        env["STUDIO_DB_URL"] = args.db_url
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else visible_devices()
    children, notes = worker_children(devices, data_dir, env, per_gpu=args.per_gpu)
    if not args.no_dashboard:
        if port_in_use(args.host, args.port):
            notes.append(f"the dashboard already runs at http://{args.host}:{args.port}")
        else:
            cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"),
                   "--server.port", str(args.port), "--server.address", args.host,
                   "--server.headless", "true"]
            children.append(Child("dashboard", cmd, env, restart=False))
    return children, notes


def usable_cores() -> int:
    """CPU cores this process may run on (:func:`engine.config.usable_cpus`: its affinity mask)."""
    from engine.config import usable_cpus

    return usable_cpus()


def split_threads(workers: int, cores: int | None = None) -> int:
    """CPU threads per worker when ``workers`` (devices × workers per device) share ``cores`` (default
    :func:`usable_cores`): ``cores // workers``, at least 1, so workers don't starve each other of decoding and
    alignment time.

    >>> split_threads(2, 32), split_threads(8, 4)
    (16, 1)
    """
    return max(1, (cores or usable_cores()) // max(1, workers))


def default_decode_threads(workers: int) -> int | None:
    """FFmpeg's threads per video for each of ``workers`` workers on one machine: 1 for two or more
    (each decodes two or more videos at once, so FFmpeg's own threads only add its frame threading's
    hand-offs: on a 32-vCPU host 16 exact-path workers decoding 1080p made 744.8 frames/s with 1
    against 690.7 with FFmpeg's choice, docs/PERFORMANCE.md), None (each job's setting) for one.

    >>> default_decode_threads(16), default_decode_threads(1)
    (1, None)
    """
    return 1 if workers > 1 else None


def split_cores(workers: int, cores: list[int] | None = None) -> list[tuple[int, ...]]:
    """Disjoint CPU sets, one per worker, for pinning ``workers`` children to their share of ``cores``
    (default: this process's affinity mask): consecutive blocks of ``len(cores) // workers``. Empty
    sets (no pinning) for a single worker, fewer cores than workers, ``$STUDIO_PIN_CORES=0`` or
    a system without affinity masks.

    Each worker's decoding (FFmpeg counts the CPUs of its mask), alignment and torch threads then
    stay on its own cores instead of every worker starting a thread per CPU of the machine.

    >>> split_cores(2, list(range(8)))
    [(0, 1, 2, 3), (4, 5, 6, 7)]
    >>> split_cores(3, list(range(4)))
    [(0,), (1,), (2,)]
    >>> split_cores(1, list(range(8)))
    [()]
    """
    if cores is None:
        try:
            cores = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = []
    share = len(cores) // max(1, workers)
    if workers < 2 or share < 1 or os.environ.get("STUDIO_PIN_CORES", "1").strip() == "0":
        return [()] * max(1, workers)
    return [tuple(cores[i * share:(i + 1) * share]) for i in range(workers)]


def _ranges(cores: tuple[int, ...]) -> str:
    """``0-3`` for (0, 1, 2, 3); ``0,2`` for (0, 2)."""
    if cores and list(cores) == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


#: Where the CUDA MPS control daemon keeps its pipes unless ``CUDA_MPS_PIPE_DIRECTORY`` says otherwise.
MPS_PIPE_DIR = "/tmp/nvidia-mps"


def mps_pipe_dir(env: dict[str, str]) -> Path:
    """The folder of the CUDA MPS pipes for processes started with ``env``: ``$CUDA_MPS_PIPE_DIRECTORY``,
    else :data:`MPS_PIPE_DIR`."""
    return Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DIR)


def mps_running(env: dict[str, str]) -> bool:
    """Whether a CUDA MPS control daemon serves processes started with ``env``: its ``control`` pipe
    is in :func:`mps_pipe_dir`."""
    return (mps_pipe_dir(env) / "control").exists()


#: Thread-count variables of the numeric libraries, set for each worker child unless already set.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_children(
    devices: list[str], data_dir: Path, env: dict[str, str], extra_args: tuple[str, ...] = (), *, once: bool = False,
    threads: int | None = None, per_gpu: int = DEFAULT_PER_GPU, decode_threads: int | None = None,
) -> tuple[list[Child], list[str]]:
    """``per_gpu`` ``python -m engine worker --device D`` children per device, one per slot whose lock
    (:func:`lock_device`) this process could take.

    With ``per_gpu`` above 1 each child also gets ``--slot S`` (its id ends in ``#S``). Each gets
    ``--threads N`` (and ``OMP_NUM_THREADS`` etc. unless set) with ``N = threads``, by default
    :func:`split_threads` over all the children (devices × ``per_gpu``), served slots included,
    and is pinned to its own share of the CPUs (:func:`split_cores`), and ``--decode-threads M``
    with ``M = decode_threads``, by default :func:`default_decode_threads`. Returns the children
    and a note for each slot that a worker already serves.
    """
    notes: list[str] = []
    children: list[Child] = []
    devices = list(dict.fromkeys(devices))  # each device once, in order
    gpu_gib = smallest_gpu_gib(devices) if parse_per_gpu(per_gpu) == AUTO else None
    per_gpu = resolve_per_gpu(per_gpu, devices, gpu_gib=gpu_gib)
    if per_gpu > 1 and any(d.startswith("cuda") for d in devices) and not mps_running(env):
        log.warning("%d workers will share each GPU without CUDA MPS (no control pipe in %s), so their GPU work "
                    "takes turns: on an H200, 4 exact-path workers made about 40 frames/s without MPS and 156 "
                    "with it. Start it before the workers: nvidia-cuda-mps-control -d (docs/scale-out.md)",
                    per_gpu, mps_pipe_dir(env))
    threads = threads or split_threads(len(devices) * per_gpu)
    if decode_threads is None:
        decode_threads = default_decode_threads(len(devices) * per_gpu)
    child_env = {**{k: str(threads) for k in THREAD_ENV}, **env}
    core_sets = iter(split_cores(len(devices) * per_gpu))
    for device in devices:
        for slot in range(per_gpu):
            cores = next(core_sets)
            label = slot_label(device, slot, per_gpu)
            fd = lock_device(data_dir / "locks", device, slot)
            if fd is None:
                notes.append(f"a worker already serves {label} for {data_dir}: not starting another")
                continue
            cmd = [sys.executable, "-m", "engine", "worker", "--device", device, "--data-dir", str(data_dir),
                   "--threads", str(threads), *(["--slot", str(slot)] if per_gpu > 1 else []),
                   *(["--decode-threads", str(decode_threads)] if decode_threads is not None else []), *extra_args]
            children.append(Child(f"worker[{label}]", cmd, child_env, pass_fds=(fd,), once=once, cores=cores))
    return children, notes


def supervise(children: list[Child], stop: threading.Event) -> int:
    """Run until ``stop`` is set, the dashboard exits or every ``once`` child is done; restart workers that die."""
    for c in children:
        c.start()
    while not stop.wait(0.5):
        for c in children:
            if c.alive() or c.finished:
                continue
            code = c.proc.returncode if c.proc else None
            if c.once and code == 0:
                c.finished = True
                log.info("%s finished", c.name)
                continue
            if not c.restart:
                log.warning("%s exited (code %s): stopping everything", c.name, code)
                stop.set()
                break
            if time.monotonic() - c.started_at < RESTART_DELAY_S:
                continue
            c.restarts += 1
            log.warning("%s exited (code %s): restarting (restart %d)", c.name, code, c.restarts)
            c.start()
        if all(c.finished for c in children):
            break
    return shutdown(children)


def shutdown(children: list[Child], grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every child once, wait ``grace_s`` seconds, then kill what is left."""
    for c in children:
        if c.alive():
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    worst = 0
    for c in children:
        if c.proc is None:
            continue
        try:
            code = c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", c.name, grace_s)
            c.proc.kill()
            code = c.proc.wait()
        log.info("%s stopped (code %s)", c.name, code)
        worst = worst or (code if code not in (0, -signal.SIGTERM) else 0)
    return worst


def network_refusal(host: str) -> str | None:
    """Why the dashboard may not be served on ``host`` (None: it may).

    A loopback address is always fine; any other needs sign-in configured in the secrets.
    """
    from dashboard.auth import HOW_TO, is_loopback, load_config, read_secrets

    if is_loopback(host):
        return None
    try:
        config = load_config(read_secrets())
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        return f"refusing to serve the dashboard on {host}: the secrets file cannot be read ({e})"
    if config.configured:
        return None
    return (
        f"refusing to serve the dashboard on {host or 'every interface'}, which other machines can reach, "
        f"without sign-in: {HOW_TO}. To use it on this machine only, leave --host at 127.0.0.1"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8501, help="dashboard port (default: 8501)")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard address (default: 127.0.0.1)")
    parser.add_argument("--data-dir", default=os.environ.get("STUDIO_DATA_DIR", "data"),
                        help="data folder shared by workers and dashboard (default: data)")
    parser.add_argument("--db-url", help="database URL (default: sqlite in the data folder)")
    parser.add_argument("--devices", help="comma list instead of auto-detection, e.g. cpu or cuda:0,cuda:1")
    parser.add_argument("--per-gpu", metavar="K",
                        help=f"worker processes per device (default: ${PER_GPU_ENV}, else {DEFAULT_PER_GPU})")
    parser.add_argument("--no-dashboard", action="store_true", help="start workers only")
    args = parser.parse_args(argv)
    try:
        args.per_gpu = parse_per_gpu(args.per_gpu) if args.per_gpu is not None else default_per_gpu()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launch: %(message)s")
    refusal = None if args.no_dashboard else network_refusal(args.host)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2

    children, notes = build_children(args)
    if any(c.name == "dashboard" for c in children):
        notes.append(f"dashboard: http://{args.host}:{args.port}")
    return serve(children, notes)


def serve(children: list[Child], notes: list[str]) -> int:
    """Print ``notes``, then supervise ``children`` until done or until SIGINT/SIGTERM stops them all."""
    for note in notes:
        print(note, flush=True)
    if not children:
        print("nothing to start", flush=True)
        return 0
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: stopping all children", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return supervise(children, stop)


def gpu_devices(spec: str) -> list[str]:
    """``--gpus`` of ``python -m engine worker``: ``all`` (every visible device, see :func:`visible_devices`)
    or GPU indices ``0,2`` (→ ``cuda:0,cuda:2``, each checked against the visible ones).

    Raises:
        ValueError: an index that is not a number or not a visible GPU.
    """
    visible = visible_devices()
    if spec.strip().lower() == "all":
        return visible
    wanted = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if not item.isdigit():
            raise ValueError(f"--gpus: expected 'all' or GPU indices like 0,1, got {spec!r}")
        if f"cuda:{item}" not in visible:
            raise ValueError(f"--gpus: cuda:{item} requested but the visible devices are {', '.join(visible)}")
        wanted.append(f"cuda:{item}")
    if not wanted:
        raise ValueError(f"--gpus: expected 'all' or GPU indices like 0,1, got {spec!r}")
    return wanted


def cmd_gpus(args: argparse.Namespace) -> int:
    """``python -m engine worker --gpus all|0,1 [--per-gpu K]``: K worker processes per device, no slot served twice.

    Each child holds the lock of its slot, ``<data>/locks/worker-<device>[-<slot>].lock`` (see
    :func:`lock_device`); a slot already served by another launch is skipped. Children that exit
    cleanly (``--burst``, ``--max-jobs``) are done; children that crash are restarted.
    """
    if args.gpu is not None or args.device or args.worker_id or getattr(args, "slot", None) is not None:
        print("error: --gpus starts its own workers on each device: don't combine it with --gpu, --device, "
              "--worker-id or --slot", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launch: %(message)s", force=True)
    try:
        per_gpu = parse_per_gpu(args.per_gpu) if getattr(args, "per_gpu", None) is not None else default_per_gpu()
        devices = gpu_devices(args.gpus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    data_dir = Path(args.data_dir or os.environ.get("STUDIO_DATA_DIR") or "data").expanduser().resolve()
    env["STUDIO_DATA_DIR"] = str(data_dir)
    if args.db_url:
        env["STUDIO_DB_URL"] = args.db_url
    extra = ["--poll", str(args.poll), "--heartbeat", str(args.heartbeat), "--stale-after", str(args.stale_after),
             "--concurrency", str(args.concurrency), "--prefetch", str(args.prefetch)]
    if args.burst:
        extra.append("--burst")
    if args.max_jobs is not None:
        extra += ["--max-jobs", str(args.max_jobs)]
    children, notes = worker_children(devices, data_dir, env, tuple(extra), once=True, threads=args.threads,
                                      per_gpu=per_gpu, decode_threads=args.decode_threads)
    return serve(children, notes)


if __name__ == "__main__":
    raise SystemExit(main())
