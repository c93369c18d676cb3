"""A live server in a background thread (real HTTP, so the official openai client and SSE are exercised)."""
from __future__ import annotations

import json
import random
import socket
import string
import threading
from dataclasses import dataclass

import httpx
import uvicorn

from conftest import wait_for
from aigc.db.session import open_db
from aigc.db import crud
from aigc.serve.app import create_app
from aigc.serve.http import uvicorn_options
from aigc.serve.registry import Registry
from aigc.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: object
    settings: Settings

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(settings: Settings, registry: Registry) -> Live:
    app = create_app(settings, registry)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_options(settings))
    config.client_timeout_s = settings.client_timeout_s
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started or not thread.is_alive(), "the test server to start", timeout=120)
    assert server.started, "the test server's thread ended before it started"
    assert httpx.get(url + "/healthz").status_code == 200
    return Live(url, server, thread, app, settings)


def tenant(sessions, name: str, plan: str, credits: float = 0.0, role: str = "developer", **key_kw) -> tuple[int, str]:
    """An organisation on ``plan`` with one user and one key: (org id, secret)."""
    with sessions.begin() as s:
        org = crud.create_org(s, name, plan, credits)
        user = crud.create_user(s, org.id, f"{role}@{name}.example", role)
        _, secret = crud.create_key(s, user, name="test", **key_kw)
        return org.id, secret


def add_key(sessions, org_id: int, email: str, role: str, **key_kw) -> str:
    with sessions.begin() as s:
        user = crud.create_user(s, org_id, email, role)
        return crud.create_key(s, user, **key_kw)[1]


def db(settings: Settings):
    return open_db(settings.resolved_database_url())


def spell_records(n: int, seed: int = 0) -> list[dict]:
    """Short conversations that differ in every prompt (so near-duplicate removal keeps them all)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(8))
        out.append({"messages": [{"role": "user", "content": f"Reverse {word}."}, {"role": "assistant", "content": word[::-1]}]})
    return out


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
