"""Dashboard sign-in settings: users, password hashes and roles (no Streamlit import).

Credentials live in Streamlit's secrets file, ``.streamlit/secrets.toml`` (never committed)::

    [studio_auth.users.alice]
    password_hash = "scrypt$16384$8$1$…"     # python -m dashboard.auth hash-password --user alice
    role = "admin"                           # viewer | user | admin (see db.access)

or Streamlit's built-in OpenID Connect login (an ``[auth]`` section, see Streamlit's
``st.login``), with roles by e-mail address::

    [studio_auth]
    default_role = "viewer"                  # signed-in OIDC users not listed below
    [studio_auth.roles]
    "alice@example.org" = "admin"

Password hashes are scrypt (``hashlib.scrypt``, N=2^14, r=8, p=1, 16-byte salt, 32-byte key)
and are compared in constant time. ``python -m dashboard.auth hash-password`` prints the
lines to paste; ``python -m dashboard.auth check`` says what is configured.
"""

from __future__ import annotations

import argparse
import base64
import functools
import getpass
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from db.access import ROLES

REPO_ROOT = Path(__file__).resolve().parents[1]

#: scrypt cost parameters: 16 MiB of memory and some 50 ms per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_KEY_BYTES = 32
#: A user name that stands for the shell; no dashboard account may take it.
RESERVED_NAMES = frozenset({"local"})
#: User names that are bare TOML keys (``[studio_auth.users.NAME]`` needs no quoting).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

HOW_TO = (
    "create a user with `python -m dashboard.auth hash-password --user NAME --role admin` and paste the "
    "printed lines into .streamlit/secrets.toml (or configure Streamlit's OIDC login in an [auth] section); "
    "see docs/security.md"
)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$<salt b64>$<key b64>`` for ``password`` (a fresh random salt by default)."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=_KEY_BYTES)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` string (constant-time compare).

    A malformed ``stored`` string never matches (it is not an error here: :func:`load_config`
    reports it).
    """
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(key, validate=True)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r), p=int(p),
            dklen=len(want), maxmem=256 * 2**20,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the user name is unknown, so both cases cost the same scrypt run."""
    return hash_password("not a password", salt=b"\0" * 16)


@dataclass(frozen=True)
class User:
    """A password account: name, scrypt hash and role."""

    name: str
    password_hash: str
    role: str


@dataclass(frozen=True)
class AuthConfig:
    """Sign-in settings read from the secrets.

    Attributes:
        users: password accounts by name.
        oidc: Streamlit's OIDC login is configured (an ``[auth]`` section).
        oidc_roles: e-mail address → role for OIDC users.
        default_role: the role of an OIDC user not in ``oidc_roles`` (None: refused).
        problems: one line per entry that was ignored (bad role, malformed hash).
    """

    users: dict[str, User] = field(default_factory=dict)
    oidc: bool = False
    oidc_roles: dict[str, str] = field(default_factory=dict)
    default_role: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        """Whether anyone can sign in at all."""
        return bool(self.users) or self.oidc

    def check(self, name: str, password: str) -> User | None:
        """The user if ``name``/``password`` match, else None; the same work either way."""
        user = self.users.get(name.strip())
        ok = verify_password(password, user.password_hash if user else _dummy_hash())
        return user if ok and user is not None else None

    def oidc_role(self, email: str | None) -> str | None:
        """The role of an OIDC user by e-mail (case-insensitive), else :attr:`default_role`."""
        roles = {k.lower(): v for k, v in self.oidc_roles.items()}
        return roles.get((email or "").lower(), self.default_role)


def load_config(secrets_: Mapping) -> AuthConfig:
    """Read :class:`AuthConfig` from parsed secrets (``st.secrets`` or a TOML mapping)."""
    section = secrets_.get("studio_auth") or {}
    problems: list[str] = []
    users: dict[str, User] = {}
    for name, entry in dict(section.get("users") or {}).items():
        entry = dict(entry or {})
        role = str(entry.get("role", "viewer"))
        stored = str(entry.get("password_hash", ""))
        if name in RESERVED_NAMES:
            problems.append(f"user {name!r} ignored: the name is reserved for the shell")
        elif role not in ROLES:
            problems.append(f"user {name!r} ignored: role {role!r} is not one of {', '.join(ROLES)}")
        elif not stored.startswith("scrypt$") or len(stored.split("$")) != 6:
            problems.append(f"user {name!r} ignored: its password_hash is not from `dashboard.auth hash-password`")
        else:
            users[name] = User(name, stored, role)
    roles = {str(k): str(v) for k, v in dict(section.get("roles") or {}).items()}
    for email, role in list(roles.items()):
        if role not in ROLES:
            problems.append(f"role of {email!r} ignored: {role!r} is not one of {', '.join(ROLES)}")
            del roles[email]
    default_role = section.get("default_role", "viewer")
    if default_role is not None and default_role not in ROLES:
        problems.append(f"default_role {default_role!r} ignored: not one of {', '.join(ROLES)}")
        default_role = None
    auth = secrets_.get("auth") or {}
    oidc = bool(auth.get("client_id") or any(isinstance(v, Mapping) and v.get("client_id") for v in auth.values()))
    return AuthConfig(users, oidc, roles, default_role, tuple(problems))


def secrets_files() -> list[Path]:
    """Where Streamlit reads secrets for the dashboard (started in this project's folder):
    ``~/.streamlit/secrets.toml``, then ``<project>/.streamlit/secrets.toml`` (later wins)."""
    return [Path.home() / ".streamlit" / "secrets.toml", REPO_ROOT / ".streamlit" / "secrets.toml"]


def read_secrets(paths: list[Path] | None = None) -> dict:
    """The merged top-level tables of the secrets files that exist (unreadable ones raise)."""
    merged: dict = {}
    for path in secrets_files() if paths is None else paths:
        if path.is_file():
            with path.open("rb") as f:
                merged.update(tomllib.load(f))
    return merged


def is_loopback(host: str | None) -> bool:
    """Whether a server address only accepts connections from this machine.

    ``""``/None (Streamlit then listens on every interface) and ``0.0.0.0``/``::`` are not.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("")
    (True, True, False, False)
    """
    host = (host or "").strip().strip("[]")
    if host.lower() in ("localhost", "ip6-localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- command line


def _cmd_hash(args: argparse.Namespace) -> int:
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("error: use at least 8 characters", file=sys.stderr)
        return 2
    print("# paste into .streamlit/secrets.toml (keep that file private; it is git-ignored)")
    print(f"[studio_auth.users.{args.user}]")
    print(f'password_hash = "{hash_password(password)}"')
    print(f'role = "{args.role}"')
    return 0


def _cmd_check(_args: argparse.Namespace) -> int:
    try:
        cfg = load_config(read_secrets())
    except (OSError, tomllib.TOMLDecodeError) as e:
        print(f"error: the secrets file cannot be read: {e}", file=sys.stderr)
        return 2
    for problem in cfg.problems:
        print(f"warning: {problem}")
    for user in cfg.users.values():
        print(f"user {user.name}: {user.role}")
    if cfg.oidc:
        print(f"OIDC login configured; default role {cfg.default_role or '(none: refused)'}, "
              f"{len(cfg.oidc_roles)} e-mail role(s)")
    if not cfg.configured:
        print(f"no sign-in configured: the dashboard may only be served on this machine; {HOW_TO}")
        return 1
    roots = os.environ.get("STUDIO_IMPORT_ROOTS", "")
    print(f"import roots: {roots or '(none set: folder import is off when served on the network)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dashboard.auth hash-password|check``."""
    parser = argparse.ArgumentParser(prog="python -m dashboard.auth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash-password", help="print a user entry with a scrypt password hash for secrets.toml")
    h.add_argument("--user", default="admin", help="the user name (default: admin)")
    h.add_argument("--role", default="admin", choices=ROLES, help="viewer, user or admin (default: admin)")
    h.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    h.set_defaults(func=_cmd_hash)
    c = sub.add_parser("check", help="list the configured users and roles (never the hashes)")
    c.set_defaults(func=_cmd_check)
    args = parser.parse_args(argv)
    if args.command == "hash-password" and (args.user in RESERVED_NAMES or not _NAME.fullmatch(args.user)):
        print(f"error: user name {args.user!r}: use ASCII letters, digits, '-' and '_' (not 'local')", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
