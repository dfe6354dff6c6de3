"""A throwaway PostgreSQL server for tests: ``initdb`` into a fresh temporary folder, ``pg_ctl start``
on a free localhost port, one new database per test, everything removed at the end.

The server binaries come from Debian's ``postgresql`` package (``scripts/ensure_postgres.sh``
installs it in ``make test``); they are looked up in ``$STUDIO_PG_BINDIR``, on ``PATH`` and
in ``/usr/lib/postgresql/<version>/bin``. ``initdb`` refuses to run as root, so as root the
server runs as the ``postgres`` system user (``runuser``). Without the binaries, that user or
psycopg, the fixtures skip with the reason.

    def test_x(pg_url):      # fixtures postgres (session) and pg_url, imported by tests/conftest.py
        Registry(url=pg_url, data_dir=...)  # pg_url: postgresql+psycopg://studio@127.0.0.1:PORT/test_3
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

#: The superuser the test server is made with (trust authentication, localhost only).
PG_USER = "studio"
#: Server settings for speed: a test database need not survive a crash.
PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (the message says why and how to fix it)."""


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest Debian version first), or None."""
    candidates = []
    if os.environ.get("STUDIO_PG_BINDIR"):
        candidates.append(Path(os.environ["STUDIO_PG_BINDIR"]))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    def version(p: Path) -> int:
        m = re.search(r"/postgresql/(\d+)/", str(p))
        return int(m.group(1)) if m else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running throwaway server. Use :func:`start_postgres`; :meth:`stop` removes everything."""

    def __init__(self, root: Path, bindir: Path, run_as: str | None) -> None:
        self.root = root
        self.bindir = bindir
        self.run_as = run_as
        self.data = root / "data"
        self.port = 0
        self._names = itertools.count(1)

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def _run(self, *args: str, timeout: float = 300) -> None:
        try:
            r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise PostgresUnavailable(f"{args[0]} did not end within {timeout:.0f} s") from e
        if r.returncode != 0:
            log = (self.root / "server.log").read_text()[-2000:] if (self.root / "server.log").exists() else ""
            raise PostgresUnavailable(f"{args[0]} failed ({r.returncode}): {(r.stderr or r.stdout).strip()} {log}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-locale")
        last: Exception | None = None
        for _ in range(3):  # a free port can be taken between the check and the start
            self.port = _free_port()
            opts = " ".join([f"-c port={self.port}", "-c listen_addresses=127.0.0.1",
                             f"-c unix_socket_directories={self.root}", *(f"-c {s}" for s in PG_SETTINGS)])
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "300",
                          "-o", opts, "start", timeout=330)
                return self
            except PostgresUnavailable as e:
                last = e
        raise PostgresUnavailable(f"the test PostgreSQL server did not start: {last}")

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """Create a new, empty database (``test_<n>`` by default) and return its URL."""
        name = name or f"test_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connections still use it."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server at once and remove its folder."""
        if self.port and (self.data / "postmaster.pid").exists():
            subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Start a throwaway server in a new temporary folder.

    Raises:
        PostgresUnavailable: no server binaries, no ``postgres`` user to run them as root,
            no psycopg, or the server did not start (the message says which).
    """
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        raise PostgresUnavailable("psycopg is not installed (pip install 'psycopg[binary]')") from e
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql "
            "(scripts/ensure_postgres.sh), or set STUDIO_PG_BINDIR"
        )
    run_as = None
    if os.geteuid() == 0:  # initdb refuses root
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as e:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server") from e
        if not shutil.which("runuser"):
            raise PostgresUnavailable("running as root and runuser (util-linux) is missing")
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="studio-pg-"))
    if run_as:
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(root, bindir, run_as)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the whole session (skips with the reason when unavailable)."""
    try:
        server = start_postgres()
    except PostgresUnavailable as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """URL of a new, empty database on the session's test server (dropped after the test)."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url.rsplit("/", 1)[1])
