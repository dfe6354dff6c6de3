"""The dashboard's sign-in gate: ``streamlit_app.py`` calls :func:`gate` before any page runs.

* Served on this machine only (``server.address`` is a loopback address) and no sign-in
  configured: the visitor is the local admin, :data:`db.access.LOCAL`'s rights.
* Sign-in configured (:mod:`dashboard.auth`): nothing but the sign-in form is shown until
  the visitor signs in, with a password or through Streamlit's OIDC login; pages and
  downloads exist only for a signed-in session, and every action runs as that user's
  :class:`~db.access.Actor`, whose role the service layer checks.
* Served on the network without sign-in configured: nothing is shown but how to configure
  it (``python -m worker.launch`` already refuses to start that way).

Pages call :func:`current_actor` (which stops the script when nobody is signed in, so a
page reached some other way shows nothing either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dashboard.auth import HOW_TO, AuthConfig, is_loopback, load_config
from db.access import Actor, ImportPolicy

log = logging.getLogger(__name__)

#: Session-state key of the signed-in identity (holds a :class:`SignedIn`, which no widget can set).
SESSION_KEY = "_studio_signed_in"


@dataclass(frozen=True)
class SignedIn:
    """Who signed in to this browser session, and how (``"password"`` or ``"oidc"``)."""

    name: str
    method: str


def served_locally() -> bool:
    """Whether the server listens on a loopback address only (not on the network)."""
    return is_loopback(st.get_option("server.address"))


def _secrets() -> dict | None:
    """The parsed secrets; {} when there are none, None when a secrets file exists but is broken."""
    try:
        return st.secrets.to_dict()
    except Exception as e:  # StreamlitSecretNotFoundError: none at all, or a parse error
        files = [Path(p) for p in st.get_option("secrets.files") or []]
        if any(p.is_file() for p in files):
            log.error("the secrets file cannot be read: %s", e)
            return None
        return {}


def _stop_with(message: str) -> None:
    st.navigation([st.Page(lambda: st.error(message), title="3DMM Studio", url_path="closed")],
                  position="hidden").run()
    st.stop()


def _sign_in_page(config: AuthConfig) -> None:
    st.title("3DMM Studio")
    st.caption("Sign in to see jobs and results.")
    if config.users:
        with st.form("studio_sign_in", enter_to_submit=True, clear_on_submit=True):
            name = st.text_input("User name", key="signin_user", autocomplete="username")
            password = st.text_input("Password", type="password", key="signin_password",
                                     autocomplete="current-password")
            submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:")
        if submitted:
            user = config.check(name, password)
            if user is None:
                log.warning("failed sign-in for %r", name)
                st.error("Wrong user name or password.")
            else:
                st.session_state[SESSION_KEY] = SignedIn(user.name, "password")
                log.info("%s signed in (%s)", user.name, user.role)
                st.rerun()
    if config.oidc and st.button("Sign in with your organisation's account", icon=":material/key:",
                                 key="signin_oidc"):
        st.login()


def _actor_of(signed: SignedIn, config: AuthConfig, policy: ImportPolicy) -> Actor | None:
    """The actor of a signed-in session, with the role the configuration gives it now."""
    if signed.method == "password":
        user = config.users.get(signed.name)
        return Actor(user.name, user.role, policy) if user is not None else None
    role = config.oidc_role(signed.name)
    return Actor(signed.name, role, policy) if role is not None else None


@dataclass(frozen=True)
class Access:
    """What this browser session may see.

    Attributes:
        actor: who acts (None: nobody is signed in, or ``closed``).
        config: the sign-in settings.
        closed: non-empty when the dashboard shows nothing but this line.
    """

    actor: Actor | None
    config: AuthConfig
    closed: str = ""


def access() -> Access:
    """Decide, without drawing anything, who this session acts as."""
    network = not served_locally()
    policy = ImportPolicy.from_env(network=network)
    raw = _secrets()
    if raw is None:
        return Access(None, AuthConfig(), "The dashboard's secrets file (.streamlit/secrets.toml) cannot be "
                      "read, so nobody can sign in: fix it (`python -m dashboard.auth check` says what is wrong).")
    config = load_config(raw)
    if not config.configured:
        if network:
            return Access(None, config, f"This dashboard is served on the network without sign-in, so it shows "
                          f"nothing: {HOW_TO}. Or serve it on this machine only (127.0.0.1).")
        return Access(Actor("local", "admin", policy), config)
    signed = st.session_state.get(SESSION_KEY)
    if not isinstance(signed, SignedIn) and config.oidc and st.user.get("is_logged_in"):
        signed = SignedIn(str(st.user.get("email") or st.user.get("name") or ""), "oidc")
    if not isinstance(signed, SignedIn):
        return Access(None, config)
    actor = _actor_of(signed, config, policy)
    if actor is None:  # removed from the configuration, or no role for this e-mail address
        return Access(None, config, f"{signed.name} may not use this dashboard (no role is configured for "
                      "this account): ask an admin.")
    return Access(actor, config)


def gate() -> Actor:
    """The actor of this browser session; otherwise show the sign-in form (or why the
    dashboard is closed) as the only page and stop the script."""
    a = access()
    if a.closed:
        _stop_with(a.closed)
    if a.actor is None:
        st.navigation([st.Page(lambda: _sign_in_page(a.config), title="Sign in", url_path="sign-in")],
                      position="hidden").run()
        st.stop()
    return a.actor


def current_actor() -> Actor:
    """The signed-in actor, for pages; stops the script (showing nothing) when there is none."""
    actor = access().actor
    if actor is None:
        st.stop()
    return actor


def sidebar(actor: Actor) -> None:
    """Who is signed in, and the sign-out button (only when sign-in is configured)."""
    if actor.name == "local":
        return
    st.caption(f"Signed in as **{actor.name}** ({actor.role})")
    if st.button("Sign out", icon=":material/logout:", key="signout"):
        signed = st.session_state.pop(SESSION_KEY, None)
        if not isinstance(signed, SignedIn) or signed.method == "oidc":
            st.logout()
        st.rerun()
