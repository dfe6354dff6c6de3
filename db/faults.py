"""Faults of the machine under the registry, in words: a locked, full or read-only database,
a full or read-only disk, and a bounded retry for the writes that must not be lost.

:func:`fault_code` sorts an exception into a short code, :func:`describe` turns it into the
one line the CLI prints and the worker logs, and :func:`retry` repeats an operation with
exponential back-off while the fault lasts (used for the final registration of a finished
job, whose results must never be thrown away because of a lock).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from db.models import ErrorCode

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Codes of :func:`fault_code` (plain strings, the values of these :class:`~db.models.ErrorCode` members).
DB_BUSY = ErrorCode.DB_BUSY.value
DISK_FULL = ErrorCode.DISK_FULL.value
READ_ONLY = ErrorCode.READ_ONLY.value
DISK_IO = ErrorCode.DISK_IO.value
DB_UNAVAILABLE = ErrorCode.DB_UNAVAILABLE.value

# Lower-case message fragments of SQLite and PostgreSQL errors → code (first match wins).
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("database is locked", DB_BUSY),
    ("database table is locked", DB_BUSY),
    ("database is busy", DB_BUSY),
    ("deadlock detected", DB_BUSY),
    ("could not serialize access", DB_BUSY),
    ("lock timeout", DB_BUSY),
    ("database or disk is full", DISK_FULL),
    ("no space left on device", DISK_FULL),
    ("disk quota exceeded", DISK_FULL),
    ("readonly database", READ_ONLY),
    ("read-only", READ_ONLY),
    ("read only", READ_ONLY),
    ("permission denied", READ_ONLY),
    ("disk i/o error", DISK_IO),
    ("unable to open database file", DB_UNAVAILABLE),
    ("could not connect", DB_UNAVAILABLE),
    ("connection refused", DB_UNAVAILABLE),
    ("server closed the connection", DB_UNAVAILABLE),
    ("terminating connection", DB_UNAVAILABLE),
    ("connection is closed", DB_UNAVAILABLE),
)

_ERRNO_CODES = {
    errno.ENOSPC: DISK_FULL, errno.EDQUOT: DISK_FULL, errno.EFBIG: DISK_FULL,
    errno.EROFS: READ_ONLY, errno.EACCES: READ_ONLY, errno.EPERM: READ_ONLY,
    errno.EIO: DISK_IO,
}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)  # SQLAlchemy's wrapper → the DB-API error
        if orig is not None and id(orig) not in seen:
            seen.add(id(orig))
            yield orig
        e = e.__cause__ or e.__context__


def fault_code(e: BaseException) -> str | None:
    """``db_busy``, ``disk_full``, ``read_only``, ``disk_io``, ``db_unavailable``, or None.

    Looks at the exception, what it wraps (SQLAlchemy's ``orig``) and its causes: engine
    errors with a ``code`` of ``disk_full``/``read_only``, ``OSError`` errnos, and the
    messages of SQLite (``database is locked``, ``database or disk is full``, ``attempt to
    write a readonly database``, ``disk I/O error``) and PostgreSQL.

    >>> import sqlite3
    >>> fault_code(sqlite3.OperationalError("database is locked")), fault_code(ValueError("x"))
    ('db_busy', None)
    """
    for err in _chain(e):
        code = getattr(err, "code", None)
        if code in (DISK_FULL, READ_ONLY):
            return code
        if isinstance(err, OSError) and err.errno in _ERRNO_CODES:
            return _ERRNO_CODES[err.errno]
        if type(err).__name__ in ("OperationalError", "DatabaseError", "InterfaceError", "InternalError"):
            text = str(err).lower()
            for fragment, found in _PATTERNS:
                if fragment in text:
                    return found
    return None


def is_db_fault(e: BaseException) -> bool:
    """True for errors worth retrying a database write for: the database (or its disk) is
    locked, full, read-only, failing or unreachable, as opposed to a bug or a bad row."""
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency of db/
        return False
    if isinstance(e, OperationalError):
        return True
    return isinstance(e, DBAPIError) and bool(getattr(e, "connection_invalidated", False))


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def describe(e: BaseException, *, busy_timeout_s: float | None = None) -> str:
    """One line that says what went wrong with the job database and what to do about it.

    >>> import sqlite3
    >>> describe(sqlite3.OperationalError("database is locked"), busy_timeout_s=60)
    'the job database is busy: another process held its write lock for more than 60 s (database is locked); try again'
    """
    code = fault_code(e)
    raw = _first_line(e)
    if code == DB_BUSY:
        waited = f" for more than {busy_timeout_s:.0f} s" if busy_timeout_s else ""
        return f"the job database is busy: another process held its write lock{waited} ({raw}); try again"
    if code == DISK_FULL:
        return f"the disk is full ({raw}): free some space under the data folder"
    if code == READ_ONLY:
        return f"the data folder or the job database is read-only ({raw}): check its permissions and mount"
    if code == DISK_IO:
        return (f"the job database could not be read or written ({raw}): its disk may be full, read-only "
                "or failing")
    if code == DB_UNAVAILABLE:
        return f"the job database cannot be opened or reached ({raw}): check its path, folder and server"
    return f"{type(e).__name__}: {raw}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: waits ``first_delay_s``, doubling up to ``max_delay_s``, until
    ``total_s`` seconds have passed since the first try (then the last error is raised).

    Each try itself may wait the database's busy timeout for the lock, so a policy of
    30 minutes covers a lock held for half an hour.
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    total_s: float = 1800.0

    def delays(self):
        """The waits between tries (an endless generator; :func:`retry` stops on ``total_s``)."""
        delay = self.first_delay_s
        while True:
            yield delay
            delay = min(self.max_delay_s, delay * 2)


def retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    should_retry: Callable[[BaseException], bool] = is_db_fault,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it returns, retrying errors ``should_retry`` accepts with back-off.

    Args:
        fn: the operation (one transaction; it must be safe to repeat).
        policy: how long to keep trying.
        what: what is being done, for the log (``"registering job 12"``).
        on_retry: called with (error, seconds until the next try) before each wait.
        sleep, clock: injectable for tests (seconds).

    Raises:
        the last error once ``policy.total_s`` has passed, or any error ``should_retry`` rejects.
    """
    start = clock()
    for delay in policy.delays():
        try:
            return fn()
        except Exception as e:
            if not should_retry(e):
                raise
            elapsed = clock() - start
            if elapsed + delay > policy.total_s:
                log.error("%s: giving up after %.0f s: %s", what, elapsed, describe(e))
                raise
            log.warning("%s failed (%s); trying again in %.1f s", what, describe(e), delay)
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
