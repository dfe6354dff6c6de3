"""Who may do what, and which server folders may be read: checked by the service layer.

Every user-side action that changes or reads beyond the job registry takes an explicit
:class:`Actor` (who asks, with which role, under which :class:`ImportPolicy`), and the
service function checks it itself, so hiding a button is never the only protection.

Roles (ordered; each has the rights of the ones before it):

* ``viewer`` — sees every page and downloads results.
* ``user`` — also uploads videos (queues jobs) and cancels or retries the jobs they submitted.
* ``admin`` — also deletes jobs, cancels or retries anyone's job, imports server folders
  and installs weight files.

The shell (``python -m engine submit``/``cancel``) and a dashboard served on this machine
only without configured sign-in act as :data:`LOCAL`, an admin allowed to read any folder.

Allowed import roots (:class:`ImportPolicy`): ``STUDIO_IMPORT_ROOTS`` lists the folders
(separated by ``os.pathsep``, ``:`` on Linux) under which server folders may be imported.
Unset, a dashboard on this machine only may import any folder, and one served on the
network may import none. Paths are resolved (symbolic links, ``..``) before they are
compared, and every file found must resolve under an allowed root too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Roles, least to most privileged.
ROLES = ("viewer", "user", "admin")

#: Action → (the least role allowed, how it is said in a refusal).
ACTIONS: dict[str, tuple[str, str]] = {
    "view": ("viewer", "viewing results"),
    "submit": ("user", "queueing videos"),
    "cancel_own": ("user", "cancelling your own jobs"),
    "retry_own": ("user", "retrying your own jobs"),
    "cancel_any": ("admin", "cancelling other people's jobs"),
    "retry_any": ("admin", "retrying other people's jobs"),
    "delete": ("admin", "deleting jobs"),
    "import": ("admin", "importing folders on the server"),
    "install": ("admin", "installing weight files"),
}

#: Environment variable listing the allowed import roots.
IMPORT_ROOTS_ENV = "STUDIO_IMPORT_ROOTS"


class PermissionDenied(PermissionError):
    """The actor's role does not allow the action, or a path lies outside the allowed roots."""


@dataclass(frozen=True)
class ImportPolicy:
    """Which server folders may be imported (registered in place) and shown.

    Attributes:
        roots: resolved allowed roots; None means any folder (a local, single-user setup);
            an empty tuple means none (folder import disabled, ``reason`` says why).
        reason: one line shown when importing is disabled.
    """

    roots: tuple[Path, ...] | None = None
    reason: str = ""

    @classmethod
    def from_env(cls, *, network: bool, environ: dict[str, str] | None = None) -> ImportPolicy:
        """The policy of a dashboard: ``$STUDIO_IMPORT_ROOTS`` if set, else any folder on this
        machine only (``network=False``) and none when served on the network."""
        env = os.environ if environ is None else environ
        raw = [p for p in env.get(IMPORT_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
        if raw:
            roots = tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in raw))
            return cls(roots=roots)
        if network:
            return cls(
                roots=(),
                reason="importing server folders is off: the dashboard is served on the network and no "
                f"import roots are configured (set {IMPORT_ROOTS_ENV} to the dataset folders that may be "
                "imported, e.g. /data/datasets; see docs/security.md)",
            )
        return cls(roots=None)

    def allows(self, path: str | Path) -> bool:
        """Whether ``path``, resolved (links and ``..`` followed), lies under an allowed root."""
        if self.roots is None:
            return True
        real = Path(path).expanduser().resolve()
        return any(real == root or real.is_relative_to(root) for root in self.roots)

    def folder(self, folder: str | Path) -> Path:
        """``folder`` resolved, if it may be imported.

        Raises:
            PermissionDenied: importing is disabled, or the folder (once links and ``..`` are
                resolved) is outside every allowed root.
        """
        if self.roots == ():
            raise PermissionDenied(self.reason or "importing server folders is off")
        real = Path(folder).expanduser().resolve()
        if not self.allows(real):
            shown = ", ".join(str(r) for r in self.roots or ())
            raise PermissionDenied(
                f"{folder} is outside the folders that may be imported ({shown}); links and '..' are "
                "followed before this check"
            )
        return real

    def split(self, files: Iterable[Path]) -> tuple[list[Path], list[Path]]:
        """(files that resolve under an allowed root, files that do not, e.g. links pointing out)."""
        inside, outside = [], []
        for f in files:
            (inside if self.allows(f) else outside).append(f)
        return inside, outside


@dataclass(frozen=True)
class Actor:
    """Who asks for an action.

    Attributes:
        name: the signed-in user's name (``"local"`` for the shell and an unauthenticated
            dashboard on this machine only).
        role: one of :data:`ROLES`.
        imports: which server folders this actor may import and see.
    """

    name: str
    role: str = "viewer"
    imports: ImportPolicy = field(default_factory=ImportPolicy)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    def may(self, action: str) -> bool:
        """Whether the role allows ``action`` (a key of :data:`ACTIONS`)."""
        least, _ = ACTIONS[action]
        return ROLES.index(self.role) >= ROLES.index(least)

    def require(self, action: str) -> None:
        """Raise :class:`PermissionDenied` unless :meth:`may` ``action``."""
        if not self.may(action):
            least, what = ACTIONS[action]
            raise PermissionDenied(f"{what} needs the {least} role; {self.name} is signed in as {self.role}")

    def owns(self, submitted_by: str | None) -> bool:
        """Whether a job submitted by ``submitted_by`` is this actor's own."""
        return submitted_by is not None and submitted_by == self.name


#: The shell and an unauthenticated dashboard served on this machine only.
LOCAL = Actor("local", "admin", ImportPolicy(roots=None))


def may_read(path: str | Path, data_dir: Path, actor: Actor) -> bool:
    """Whether the dashboard may read ``path`` for ``actor``: inside the data folder or an
    allowed import root (resolved: links pointing out are not inside)."""
    real = Path(path).expanduser().resolve()
    data = Path(data_dir).resolve()
    return real.is_relative_to(data) or actor.imports.allows(real)


def display_path(path: str | Path, data_dir: Path, roots: Iterable[Path] | None = ()) -> str:
    """A path as the UI shows it: relative to the data folder (``results/12/clip.npz``), to an
    import root (``<root name>/a/b.mp4``), to this project (``checkpoints/epoch_20.pth``) or to
    the home folder (``~/…``); otherwise only its last two parts (``…/folder/file``).
    Never an absolute server path."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else p.resolve()
    repo = Path(__file__).resolve().parents[1]
    bases: list[tuple[Path, str]] = [(Path(data_dir).resolve(), "")]
    bases += [(Path(r), f"{Path(r).name}/") for r in roots or ()]
    bases += [(repo, ""), (Path.home(), "~/")]
    for candidate in (p, p.resolve()):
        for base, prefix in bases:
            if candidate == base:
                return prefix.rstrip("/") or base.name or "."
            if candidate.is_relative_to(base):
                return prefix + candidate.relative_to(base).as_posix()
    return "…/" + "/".join(p.parts[-2:])


_ABSOLUTE = re.compile(r"""(?:(?<=^)|(?<=[\s'"`(\[=]))/[^\s'"`(),;:\[\]]+""")


def relative_text(text: str, data_dir: Path, roots: Iterable[Path] | None = ()) -> str:
    """``text`` with every absolute path in it shown as :func:`display_path` shows it (URLs are
    left alone): for error messages and reports drawn by the UI."""
    return _ABSOLUTE.sub(lambda m: display_path(m.group(0).rstrip("."), data_dir, roots) + (
        "." if m.group(0).endswith(".") else ""), str(text))


def user_message(message: str, input_path: Path, name: str, data_dir: Path) -> str:
    """A job's error as its user should read it: the stored input (``uploads/ab/<sha>.mp4``), by
    its path or its bare file name (the engine's messages use either), is named by the name it
    was submitted under; other data-folder paths are made relative.

    >>> user_message("ab12.mp4: no face found", Path("/d/uploads/ab/ab12.mp4"), "talk.mp4", Path("/d"))
    'talk.mp4: no face found'
    """
    stored = Path(input_path)
    for shown in dict.fromkeys((str(stored), str(stored.resolve()))):
        message = message.replace(shown, name)
    if stored.name != name:
        message = re.sub(rf"(?<![\w/.-]){re.escape(stored.name)}(?![\w.-])", lambda _: name, message)
    return relative_text(message, data_dir)
