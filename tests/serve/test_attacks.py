"""Attacks on the server, each a test: an authorisation matrix generated from the route table (every route, every role,
own tenant and another), signed URLs tampered with, path traversal in every path parameter, oversized bodies and
headers, slow clients, secrets in logs, the operator token's comparison, complaint floods behind a proxy, CORS."""
from __future__ import annotations

import hmac
import io
import logging
import re
import socket
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from aigc.db import crud
from aigc.db.models import FineTuneJob, Job
from aigc.serve.app import JsonFormatter, create_app
from aigc.serve.registry import Registry
from aigc.settings import Settings
from tests.serve.helpers import db, jsonl, spell_records, start

OPERATOR_TOKEN = "operator-" + "s3cret" * 6
PASSWORD = "a long enough passphrase"

# ------------------------------------------------------------------ the intended policy

ANON, OPERATOR = "anonymous", "operator"
ROLES = ("admin", "developer", "viewer", "reviewer")
EVERYONE = frozenset((ANON, OPERATOR, *ROLES))
ANY_KEY = frozenset((OPERATOR, *ROLES))
TENANT = frozenset(ROLES)
GEN = frozenset(("admin", "developer"))
READ = frozenset(("admin", "developer", "viewer"))
ADMIN = frozenset(("admin",))
OP = frozenset((OPERATOR,))
REVIEW = frozenset((OPERATOR, "admin", "reviewer"))
SIGNED = "signed"  # no credentials: a signature in the URL (tested in test_signed_urls)

# Who may call each API route. A route the server has and this table lacks fails the suite (so does a rule for a route
# that is gone): a new route needs a decision here.
API = {
    ("GET", "/openapi.json"): EVERYONE, ("GET", "/docs"): EVERYONE, ("GET", "/docs/oauth2-redirect"): EVERYONE,
    ("GET", "/redoc"): EVERYONE,
    ("GET", "/healthz"): EVERYONE, ("GET", "/readyz"): EVERYONE, ("GET", "/metrics"): EVERYONE,
    ("GET", "/v1/models"): ANY_KEY, ("GET", "/v1/models/{model_id}"): ANY_KEY,
    ("POST", "/v1/completions"): GEN, ("POST", "/v1/chat/completions"): GEN, ("POST", "/v1/embeddings"): GEN,
    ("POST", "/v1/images/generations"): GEN, ("POST", "/v1/images/edits"): GEN, ("GET", "/v1/images/files/{name}"): SIGNED,
    ("POST", "/v1/audio/generations"): GEN, ("POST", "/v1/videos/generations"): GEN,
    ("POST", "/v1/audio/speech"): GEN, ("GET", "/v1/audio/voices"): GEN,
    ("GET", "/v1/jobs"): READ, ("GET", "/v1/jobs/{job_id}"): READ, ("GET", "/v1/media/{job_id}/{name}"): SIGNED,
    ("POST", "/v1/files"): GEN, ("GET", "/v1/files"): READ, ("GET", "/v1/files/{file_id}"): READ,
    ("DELETE", "/v1/files/{file_id}"): GEN, ("GET", "/v1/files/{file_id}/content"): GEN,
    ("POST", "/v1/fine_tuning/jobs"): GEN, ("GET", "/v1/fine_tuning/jobs"): READ,
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): READ, ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): GEN,
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): READ, ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): READ,
    ("GET", "/v1/usage"): frozenset((OPERATOR, *READ)),
    ("POST", "/v1/admin/plans"): OP, ("GET", "/v1/admin/plans"): OP, ("PUT", "/v1/admin/prices"): OP,
    ("GET", "/v1/admin/prices"): OP, ("POST", "/v1/admin/organizations"): OP, ("GET", "/v1/admin/organizations"): OP,
    ("PATCH", "/v1/admin/organizations/{org_id}"): OP, ("POST", "/v1/admin/organizations/{org_id}/credits"): OP,
    ("GET", "/v1/organization"): TENANT, ("GET", "/v1/organization/users"): frozenset(("admin", "viewer")),
    ("POST", "/v1/organization/users"): ADMIN, ("GET", "/v1/organization/keys"): frozenset(("admin", "viewer")),
    ("POST", "/v1/organization/keys"): ADMIN, ("DELETE", "/v1/organization/keys/{key_id}"): ADMIN,
    ("POST", "/v1/provenance/verify"): EVERYONE, ("POST", "/v1/moderations"): TENANT,
    ("POST", "/v1/complaints"): EVERYONE, ("GET", "/v1/complaints"): REVIEW,
    ("POST", "/v1/complaints/{complaint_id}/decision"): REVIEW,
    ("GET", "/v1/generations/{generation_id}/explanation"): ANY_KEY,
    ("GET", "/v1/organization/policy"): TENANT, ("PUT", "/v1/organization/policy"): ADMIN,
}
# The console (a browser session cookie). Signed out, a page sends the browser to the sign-in page.
MODELS, USAGE = frozenset((OPERATOR, *ROLES)), frozenset((OPERATOR, *READ))
CONSOLE = {
    ("GET", "/"): EVERYONE, ("GET", "/console"): ANY_KEY, ("GET", "/console/login"): EVERYONE,
    ("POST", "/console/login"): EVERYONE, ("POST", "/console/logout"): ANY_KEY, ("GET", "/console/lang/{code}"): EVERYONE,
    ("GET", "/console/playground"): GEN, ("GET", "/console/api/templates/{name}/render"): GEN,
    ("GET", "/console/api/requests/{request_id}"): ANY_KEY, ("GET", "/console/generations/{generation_id}"): ANY_KEY,
    ("GET", "/console/models"): MODELS, ("GET", "/console/models/{model_id:path}"): MODELS,
    ("GET", "/console/training"): READ, ("GET", "/console/training/jobs"): READ,
    ("GET", "/console/training/{job_id}"): READ, ("GET", "/console/training/{job_id}/stream"): READ,
    ("GET", "/console/usage"): USAGE, ("GET", "/console/usage.csv"): USAGE, ("GET", "/console/usage/statement"): READ,
    ("GET", "/console/keys"): ADMIN, ("POST", "/console/users/{user_id}/password"): ADMIN,
    ("GET", "/console/review"): REVIEW, ("GET", "/console/audit"): OP,
}
# Routes naming one tenant's resource: another tenant's admin (whose role may call them) must find nothing.
OWNED = {"file_id", "job_id", "key_id", "complaint_id", "generation_id", "request_id", "user_id"}


def route_table(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app answers (HEAD aside), through included routers."""
    out = set()

    def walk(routes):
        for r in routes:
            if hasattr(r, "path"):
                for m in getattr(r, "methods", None) or ():
                    if m != "HEAD":
                        out.add((m, r.path))
            else:  # an included router (FastAPI keeps the router and its prefix)
                walk(r.original_router.routes)
    walk(app.routes)
    return out


# ------------------------------------------------------------------ a server with two tenants and their resources


class World:
    def __init__(self, tmp_path, **settings):
        self.settings = Settings(home=tmp_path, admin_token=OPERATOR_TOKEN, log_json=True, **settings)
        self.sessions = db(self.settings)
        self.keys: dict[str, str] = {}
        with self.sessions.begin() as s:
            crud.create_plan(s, "payg", "payg")
            crud.set_price(s, "*", input_per_1k=0.01, output_per_1k=0.02)
            for org_name in ("acme", "globex"):
                org = crud.create_org(s, org_name, "payg")
                for role in ROLES if org_name == "acme" else ("admin",):
                    user = crud.create_user(s, org.id, f"{role}@{org_name}.example", role)
                    crud.set_password(s, org.id, user.id, PASSWORD)
                    self.keys[role if org_name == "acme" else "stranger"] = crud.create_key(s, user, name=role)[1]
                    if org_name == "acme" and role == "admin":
                        self.acme, self.acme_admin_user = org.id, user.id
                        victim, _ = crud.create_key(s, user, name="victim")
                        self.victim_key = victim.id
            self.globex = crud.get_org(s, "globex").id
        self.app = create_app(self.settings, Registry.from_paths([], echo=["echo"]))
        self.client = TestClient(self.app, follow_redirects=False)
        self.client.__enter__()

    def close(self):
        self.client.__exit__(None, None, None)

    def headers(self, who: str) -> dict:
        if who == ANON:
            return {}
        return {"Authorization": f"Bearer {OPERATOR_TOKEN if who == OPERATOR else self.keys[who]}"}

    def seed(self) -> dict:
        """A resource of acme's for every path parameter."""
        c, h = self.client, self.headers("admin")
        f = c.post("/v1/files", headers=h, files={"file": ("s.jsonl", jsonl(spell_records(12)))}, data={"purpose": "fine-tune"})
        assert f.status_code == 200, f.text
        r = c.post("/v1/completions", headers=h, json={"model": "echo", "prompt": "hello there", "max_tokens": 3})
        assert r.status_code == 200, r.text
        generation = r.headers["x-generation-ids"].split(",")[0] if "x-generation-ids" in r.headers else None
        if generation is None:
            with self.sessions() as s:
                generation = s.query(crud.Generation).filter_by(org_id=self.acme).one().id
        complaint = c.post("/v1/complaints", json={"reason": "misleading", "generation_id": generation})
        assert complaint.status_code == 201, complaint.text
        with self.sessions.begin() as s:
            s.add(Job(id="job_" + "a" * 24, org_id=self.acme, kind="audio", model="echo", status="failed", error="test"))
            s.add(FineTuneJob(id="ftjob-" + "b" * 24, org_id=self.acme, model="echo", training_file=f.json()["id"],
                              status="cancelled"))
        return {"file_id": f.json()["id"], "generation_id": generation, "complaint_id": str(complaint.json()["id"]),
                "key_id": str(self.victim_key), "org_id": str(self.acme), "user_id": str(self.acme_admin_user),
                "request_id": r.headers["x-request-id"], "model_id": "echo", "name": "x.png", "code": "en",
                "job_id": "job_" + "a" * 24}

    def console_session(self, who: str) -> httpx.Cookies:
        c = TestClient(self.app, follow_redirects=False)
        if who != ANON:
            c.get("/console/login")
            key = OPERATOR_TOKEN if who == OPERATOR else self.keys[who]
            r = c.post("/console/login", data={"csrf": c.cookies.get("aigc_login_csrf"), "key": key})
            assert r.status_code == 303 and "failed" not in r.headers["location"], r.headers
        return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("attacks"))
    w.ids = w.seed()
    yield w
    w.close()


QUERY = {"/console/usage/statement": "?month=2026-12", "/v1/images/files/{name}": "?expires=1&sig=x",
         "/v1/media/{job_id}/{name}": "?expires=1&sig=x"}  # what a route needs beyond its path to reach its checks
VALID = {"/v1/complaints/{complaint_id}/decision": {"action": "takedown"}}  # bodies that would act, were it allowed


def fill(path: str, ids: dict, fine_tune: bool) -> str:
    def one(m):
        name = m.group(1).split(":")[0]
        if name == "job_id" and fine_tune:
            return "ftjob-" + "b" * 24
        return ids[name]
    return re.sub(r"\{([^}]+)\}", one, path) + QUERY.get(path, "")


def call(client, method: str, path: str, headers: dict | None = None, body: dict | None = None):
    body = body if body is not None else {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, path, headers=headers or {}, json=body)


def test_every_route_has_a_rule(world):
    routes = route_table(world.app)
    assert routes - set(API) - set(CONSOLE) == set(), "routes without a rule in the policy table"
    assert (set(API) | set(CONSOLE)) - routes == set(), "rules for routes that no longer exist"


def test_authorisation_matrix_of_the_api(world):
    wrong = []
    for (method, path), allowed in sorted(API.items()):
        if allowed == SIGNED:
            for who in (ANON, OPERATOR, "admin"):  # credentials are no substitute for the signature
                r = call(world.client, method, fill(path, world.ids, False), world.headers(who))
                if r.status_code != 403 or r.json()["error"]["code"] != "invalid_signature":
                    wrong.append((method, path, who, r.status_code))
            continue
        url = fill(path, world.ids, "/fine_tuning/" in path)
        for who in sorted(EVERYONE):
            r = call(world.client, method, url, world.headers(who))
            denied = r.status_code in (401, 403)
            if who in allowed and denied:
                wrong.append((method, path, who, r.status_code, r.text[:120]))
            if who not in allowed and not denied:
                wrong.append((method, path, who, r.status_code, "admitted"))
            if who == ANON and who not in allowed and r.status_code != 401:
                wrong.append((method, path, who, r.status_code, "anonymous needs 401"))
    assert wrong == [], "\n".join(map(str, wrong))


def test_another_tenant_finds_nothing(world):
    """globex's admin (a role each of these routes admits) names acme's resources: never found, nothing changed."""
    before = _snapshot(world)
    wrong = []
    for (method, path), allowed in sorted(API.items()):
        params = set(re.findall(r"\{([^}:]+)", path))
        if not params & OWNED or allowed == SIGNED or "admin" not in allowed:
            continue
        r = call(world.client, method, fill(path, world.ids, "/fine_tuning/" in path), world.headers("stranger"),
                 VALID.get(path))
        if r.status_code not in (404, 422) or (r.status_code == 422 and method == "GET"):
            wrong.append((method, path, r.status_code, r.text[:160]))
    for (method, path), allowed in sorted(CONSOLE.items()):
        params = set(re.findall(r"\{([^}:]+)", path))
        if not params & OWNED or "admin" not in allowed:
            continue
        c = world.console_session("stranger")
        r = c.request(method, fill(path, world.ids, False), data={"csrf": "x"} if method == "POST" else None)
        if r.status_code not in (403, 404):
            wrong.append((method, path, r.status_code, r.text[:160]))
    assert wrong == [], "\n".join(map(str, wrong))
    assert _snapshot(world) == before


def _snapshot(world) -> dict:
    c, h = world.client, world.headers("admin")
    return {"file": c.get(f"/v1/files/{world.ids['file_id']}", headers=h).status_code,
            "keys": sorted(k["id"] for k in c.get("/v1/organization/keys", headers=h).json()["data"] if not k.get("revoked")),
            "complaint": c.get("/v1/complaints", headers=h).json()["data"][0]["status"]}


def test_authorisation_matrix_of_the_console(world):
    wrong = []
    clients = {who: world.console_session(who) for who in EVERYONE}
    for (method, path), allowed in sorted(CONSOLE.items()):
        url = fill(path, world.ids, False).replace("/console/training/job_" + "a" * 24, "/console/training/ftjob-" + "b" * 24)
        for who in sorted(EVERYONE):
            c = clients[who]
            data = None
            if method == "POST":
                csrf = "" if who == ANON else _csrf(c)
                data = {"csrf": csrf, "password": PASSWORD + "!", "key": "", "email": ""}
            if path == "/console/logout":
                continue  # checked last: it ends the session
            r = c.request(method, url, data=data)
            to_login = r.status_code == 303 and r.headers["location"].startswith("/console/login") or r.status_code == 401
            denied = r.status_code == 403 or to_login
            if who in allowed and denied and path not in ("/console/login",):
                wrong.append((method, path, who, r.status_code, r.headers.get("location")))
            if who not in allowed and not denied:
                wrong.append((method, path, who, r.status_code, "admitted"))
            if who == ANON and who not in allowed and not to_login:
                wrong.append((method, path, who, r.status_code, "signed out must go to the sign-in page"))
    for who in sorted(EVERYONE - {ANON}):
        r = clients[who].post("/console/logout", data={"csrf": _csrf(clients[who])})
        assert r.status_code == 303 and clients[who].get("/console/keys").status_code == 303
    assert wrong == [], "\n".join(map(str, wrong))


def _csrf(c) -> str:
    page = c.get("/console/models").text
    m = re.search(r'name="csrf-token" content="([^"]+)"', page)
    return m.group(1) if m else ""


# ------------------------------------------------------------------ signed URLs


def test_signed_urls_tampered_expired_or_replayed(world):
    from aigc.serve.routes import images, media

    svc = world.app.state.service
    c = world.client
    (svc.settings.home / "images").mkdir(exist_ok=True)
    (svc.settings.home / "images" / "abc_1.png").write_bytes(b"\x89PNG acme's image")
    mine, theirs = "job_" + "1" * 24, "job_" + "2" * 24
    for job, data in ((mine, b"RIFF acme"), (theirs, b"RIFF globex")):
        (svc.settings.home / "media" / job).mkdir(parents=True, exist_ok=True)
        (svc.settings.home / "media" / job / "track.wav").write_bytes(data)
    soon, past = int(time.time()) + 600, int(time.time()) - 1
    good_image = f"/v1/images/files/abc_1.png?expires={soon}&sig={images.sign(svc.url_secret, 'abc_1.png', soon)}"
    sig = media.sign(svc.url_secret, mine, "track.wav", soon)
    good_media = f"/v1/media/{mine}/track.wav?expires={soon}&sig={sig}"
    assert c.get(good_image).content == b"\x89PNG acme's image" and c.get(good_media).content == b"RIFF acme"

    def code(url):
        r = c.get(url)
        return r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None

    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert code(f"/v1/media/{mine}/track.wav?expires={soon}&sig={flipped}") == (403, "invalid_signature")
    assert code(f"/v1/media/{mine}/track.wav?expires={soon + 3600}&sig={sig}") == (403, "invalid_signature")  # extended
    assert code(f"/v1/media/{theirs}/track.wav?expires={soon}&sig={sig}") == (403, "invalid_signature")  # replayed
    assert code(f"/v1/media/{mine}/other.wav?expires={soon}&sig={sig}") == (403, "invalid_signature")
    image_sig = images.sign(svc.url_secret, "track.wav", soon)  # an image signature on a media URL
    assert code(f"/v1/media/{mine}/track.wav?expires={soon}&sig={image_sig}") == (403, "invalid_signature")
    assert code(f"/v1/media/{mine}/track.wav?expires={past}&sig={media.sign(svc.url_secret, mine, 'track.wav', past)}") \
        == (403, "url_expired")
    assert code(f"/v1/images/files/abc_1.png?expires={past}&sig={images.sign(svc.url_secret, 'abc_1.png', past)}") \
        == (403, "url_expired")
    assert code(good_image.replace("abc_1", "abc_2")) == (403, "invalid_signature")
    assert code(f"/v1/media/{mine}/track.wav?expires={soon}&sig=") == (403, "invalid_signature")
    # another server's secret (each server of a fleet must share HOME/keys, or their URLs fail everywhere but home)
    other = hmac.new(b"x" * 32, f"media:{mine}/track.wav:{soon}".encode(), "sha256").hexdigest()[:32]
    assert code(f"/v1/media/{mine}/track.wav?expires={soon}&sig={other}") == (403, "invalid_signature")


# ------------------------------------------------------------------ path traversal

TRAVERSAL = ["..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fsecret.txt", "..%5C..%5Csecret.txt",
             "....%2F%2F....%2F%2Fsecret.txt", "x%00.png", "%252e%252e%252fsecret.txt", "..", "%2e%2e"]


def test_path_traversal_in_every_path_parameter(world):
    (world.settings.home / "secret.txt").write_text("TOP-SECRET-CONTENT")
    wrong = []
    for table in (API, CONSOLE):
        for (method, path), allowed in sorted(table.items()):
            params = re.findall(r"\{([^}]+)\}", path)
            for param in params:
                for bad in TRAVERSAL:
                    url = fill(path.replace("{" + param + "}", "@@"), world.ids, "/fine_tuning/" in path).replace("@@", bad)
                    for who in ("admin", OPERATOR):
                        if path.startswith("/console"):
                            r = world.console_session(who).request(method, url)
                        else:
                            r = call(world.client, method, url, world.headers(who))
                        leaked = b"TOP-SECRET" in r.content or b"root:x:0:0" in r.content
                        if leaked or r.status_code >= 500 or (r.status_code == 200 and method != "GET"):
                            wrong.append((method, path, param, bad, who, r.status_code))
                        if r.status_code == 200 and param in ("name", "file_id", "job_id"):
                            wrong.append((method, path, param, bad, who, "200"))
    assert wrong == [], "\n".join(map(str, wrong))


# ------------------------------------------------------------------ sizes, slow clients (a real socket)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("edge"), admin_token=OPERATOR_TOKEN, client_timeout_s=1.0,
                        max_body_mb=1, max_header_kb=8, complaints_per_minute=3, complaints_per_minute_total=1000)
    server = start(settings, Registry.from_paths([], echo=["echo"]))
    server.sessions = db(settings)
    yield server
    server.stop()


def test_oversized_bodies_and_headers(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{" + b" " * (2 * 2**20) + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: refused as soon as the count passes the limit
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(live.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(live.url + "/v1/models", headers={"x-padding": "a" * 9000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    r = httpx.get(live.url + "/v1/models", headers={f"x-h{i}": "a" * 60 for i in range(200)})
    assert r.status_code == 431
    assert httpx.get(live.url + "/healthz").status_code == 200


def _raw(live, payload: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    host, port = live.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.settimeout(wait)
    t0 = time.monotonic()
    s.sendall(payload)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server held a slow client's connection for more than {wait} s")
    finally:
        s.close()
    return data, time.monotonic() - t0


def test_slow_clients_are_cut_off(live):
    head, took = _raw(live, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # slowloris
    assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in head and took < 8
    body, took = _raw(live, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                            b"Content-Type: application/json\r\n\r\n{\"model\":")
    assert b" 408 " in body.split(b"\r\n")[0] and b"request_timeout" in body and took < 8
    _, took = _raw(live, b"")  # a socket opened and left
    assert took < 8
    assert httpx.get(live.url + "/healthz").status_code == 200  # others were served meanwhile


# ------------------------------------------------------------------ secrets never in logs


def test_keys_and_data_keys_never_in_logs(tmp_path, monkeypatch):
    seen: list[tuple] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    world = World(tmp_path)
    logger = logging.getLogger("aigc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # what aigc serve logs at
    try:
        c, h = world.client, world.headers("admin")
        made = c.post("/v1/organization/keys", headers=h, json={"name": "made", "user": "developer@acme.example"})
        assert made.status_code in (200, 201), made.text
        new_key = made.json()["key"] if "key" in made.json() else made.json()["api_key"]
        assert c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {new_key}"},
                      json={"model": "echo", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]}
                      ).status_code == 200
        wrong_key = "sk-aigc-" + "A" * 43
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        assert c.get("/v1/admin/plans", headers=world.headers(OPERATOR)).status_code == 200
        near = OPERATOR_TOKEN[:-1] + "X"
        assert c.get("/v1/admin/plans", headers={"Authorization": f"Bearer {near}"}).status_code in (401, 403)
        short = "operator"
        assert c.get("/v1/admin/plans", headers={"Authorization": f"Bearer {short}"}).status_code in (401, 403)
        ring = world.app.state.service.governance.keyring
        c.get("/console/login")
        c.post("/console/login", data={"csrf": c.cookies.get("aigc_login_csrf"), "key": new_key})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        world.close()
    # the operator token is compared in constant time, whatever the length of the guess
    compared = {(a, b) for a, b in seen if b == OPERATOR_TOKEN.encode()}
    assert (near.encode(), OPERATOR_TOKEN.encode()) in compared and (short.encode(), OPERATOR_TOKEN.encode()) in compared
    logs = buf.getvalue()
    assert '"msg": "request"' in logs and "sk-aigc-" in logs  # the key prefixes are there (so the grep below means something)
    secrets_ = [*world.keys.values(), new_key, wrong_key, OPERATOR_TOKEN, near, "4111 1111 1111 1111"]
    for material in ring.keys.values():
        import base64
        secrets_ += [base64.b64encode(material).decode(), base64.urlsafe_b64encode(material).decode(), material.hex()]
    leaked = [s for s in secrets_ if s in logs]
    assert leaked == []
    # nor in the database: keys are stored hashed
    raw = (world.settings.home / "aigc.db").read_bytes()
    assert not any(k.encode() in raw for k in [*world.keys.values(), new_key])


# ------------------------------------------------------------------ complaint floods, proxies


def _complain(url: str, forwarded: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return httpx.post(url + "/v1/complaints", json={"reason": "flood", "content": uuid.uuid4().hex},
                      headers=headers, timeout=30).status_code


def test_complaint_flood_and_forwarded_addresses(live, tmp_path):
    # Not a trusted proxy: X-Forwarded-For is ignored, every request counts against the peer's own address.
    codes = [_complain(live.url, f"10.0.0.{i}") for i in range(5)]
    assert codes == [201, 201, 201, 429, 429]
    settings = Settings(home=tmp_path, trusted_proxies="127.0.0.1", complaints_per_minute=2, complaints_per_minute_total=6)
    proxied = start(settings, Registry.from_paths([], echo=["echo"]))
    try:
        # behind a trusted proxy, each client has its own limit, the address the proxy saw (the rightmost untrusted)
        assert [_complain(proxied.url, "10.1.0.1") for _ in range(3)] == [201, 201, 429]
        assert _complain(proxied.url, "6.6.6.6, 10.1.0.2") == 201  # a forged first hop changes nothing: 10.1.0.2 counts
        assert _complain(proxied.url, "7.7.7.7, 10.1.0.2") == 201
        assert _complain(proxied.url, "8.8.8.8, 10.1.0.2") == 429
        # a crowd of addresses: the limit for all of them together (6 a minute here; 4 were admitted above)
        crowd = [_complain(proxied.url, f"10.2.0.{i}") for i in range(4)]
        assert crowd == [201, 201, 429, 429]
    finally:
        proxied.stop()


# ------------------------------------------------------------------ CORS


def test_cors_closed_by_default_open_only_to_configured_origins(world, tmp_path):
    c = world.client
    pre = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in pre.headers
    r = c.get("/v1/models", headers={**world.headers("admin"), "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    open_ = Settings(home=tmp_path, cors_origins="https://app.example")
    with TestClient(create_app(open_, Registry.from_paths([], echo=["echo"]))) as c2:
        ok = c2.options("/v1/models", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
        assert ok.headers.get("access-control-allow-origin") == "https://app.example"
        bad = c2.options("/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in bad.headers
