"""Console sessions without a browser: idle expiry, a key's revocation ending its sessions, sign-in by password,
the CSRF checks on the console's own forms."""
from __future__ import annotations

import time

from fastapi.testclient import TestClient

from aigc.db import crud
from tests.serve.helpers import db

PASSWORD = "a long enough passphrase"


def make(tmp_path, **kw):
    from aigc.serve.app import create_app
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path, admin_token="operator-token", **kw)
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        org = crud.create_org(s, "acme", "payg")
        user = crud.create_user(s, org.id, "admin@acme.example", "admin")
        crud.set_password(s, org.id, user.id, PASSWORD)
        key, secret = crud.create_key(s, user)
    return TestClient(create_app(settings, Registry.from_paths([], echo=["echo"])), follow_redirects=False), secret, key.id


def sign_in(c, **form):
    c.get("/console/login")
    return c.post("/console/login", data={"csrf": c.cookies.get("aigc_login_csrf"), **form})


def test_password_sign_in_idle_expiry_and_sign_out(tmp_path):
    c, _, _ = make(tmp_path, console_idle_minutes=0.02)  # 1.2 s
    with c:
        assert sign_in(c, email="admin@acme.example", password="wrong one!").headers["location"].startswith("/console/login?failed=1")
        r = sign_in(c, email="admin@acme.example", password=PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/console"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # plain HTTP here
        assert c.get("/console/keys").status_code == 200
        # the API answers the same session (GET needs no CSRF header)
        assert c.get("/v1/organization/keys").status_code == 200
        time.sleep(1.5)
        r = c.get("/console/keys")
        assert r.status_code == 303 and "expired=1" in r.headers["location"]
        assert c.get("/v1/models").json()["error"]["code"] == "session_expired"
        old = sign_in(c, email="admin@acme.example", password=PASSWORD)
        time.sleep(1.5)
        sign_in(c, email="admin@acme.example", password=PASSWORD)  # signing in forgets the sessions idle too long
        with db(c.app.state.service.settings)() as s:
            assert s.query(crud.ConsoleSession).count() == 1 and old.status_code == 303
        assert c.post("/console/logout", data={"csrf": "nope"}).status_code == 403  # a forged form
        csrf = c.get("/console/keys").text.split('name="csrf-token" content="')[1].split('"')[0]
        assert c.post("/console/logout", data={"csrf": csrf}).status_code == 303
        assert c.get("/console/keys").status_code == 303


def test_revoking_the_key_ends_its_sessions(tmp_path):
    c, secret, key_id = make(tmp_path)
    with c:
        assert sign_in(c, key=secret).status_code == 303
        assert c.get("/console/playground").status_code == 200
        with db(c.app.state.service.settings).begin() as s:
            crud.revoke_key(s, s.get(crud.ApiKey, key_id).org_id, key_id)
        assert c.get("/console/playground").status_code == 303


def test_login_form_needs_its_csrf_token(tmp_path):
    c, secret, _ = make(tmp_path)
    with c:
        c.get("/console/login")
        r = c.post("/console/login", data={"key": secret})
        assert r.status_code == 403 and "aigc_session" not in r.headers.get("set-cookie", "")
        assert sign_in(c, key="operator-token").status_code == 303
        assert c.get("/console").headers["location"] == "/console/audit"
        # an open redirect is not possible through ?next=
        c.cookies.clear()
        r = sign_in(c, key=secret, next="https://evil.example/")
        assert r.headers["location"] == "/console"


def test_readme_shows_the_console_and_the_package_ships_its_files():
    from pathlib import Path

    import aigc.serve.console as console

    root = Path(__file__).resolve().parents[2]
    assert "![The console" in (root / "README.md").read_text(encoding="utf-8")
    shot = root / "docs" / "console.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300_000
    here = Path(console.__file__).parent
    for name in ("static/vendor/htmx.min.js", "static/vendor/uPlot.iife.min.js", "static/console.js", "static/console.css",
                 "templates/base.html"):
        assert (here / name).is_file(), name
