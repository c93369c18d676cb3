"""Real server processes for the fleet tests: `aigc serve --workers N` on a fresh PostgreSQL database, a private
PostgreSQL server to restart, a private Redis server."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from tests.serve.conftest import postgres_url
from tests.serve.helpers import free_port


@contextmanager
def fresh_database():
    """A new database on the test PostgreSQL server (AIGC_TEST_POSTGRES_URL), dropped after."""
    import psycopg

    base = postgres_url()
    name = "aigc_fleet_" + uuid.uuid4().hex[:10]
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Fleet:
    url: str
    proc: subprocess.Popen
    home: Path
    database_url: str
    log: Path

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if _is_worker(int(p))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _is_worker(pid: int) -> bool:
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def start_fleet(database_url: str, home: Path, args: list[str], workers: int = 2, env: dict | None = None) -> Fleet:
    port = free_port()
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "AIGC_HOME": str(home), "AIGC_DATABASE_URL": database_url, "AIGC_HEARTBEAT_S": "0.5",
                "AIGC_LEASE_S": "5", "AIGC_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "aigc.cli", "serve", *args, "--port", str(port), "--workers", str(workers)],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    fleet = Fleet(f"http://127.0.0.1:{port}", proc, home, database_url, log)
    try:
        wait_for(lambda: httpx.get(fleet.url + "/readyz", timeout=2).status_code == 200, "the fleet to answer", timeout=180,
                 proc=proc)
        wait_for(lambda: len(fleet.workers()) == workers and _registered(database_url) >= workers,
                 f"{workers} workers to register", timeout=120, proc=proc)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _registered(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM servers")).scalar()
    finally:
        engine.dispose()


# ---------------------------------------------------------------- a private PostgreSQL server (to restart)

@dataclass
class PrivatePostgres:
    bin: Path
    data: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data / "data"), "-w", "-t", "60",
                        "-l", str(self.data / "server.log"), *args], check=True, capture_output=True)

    def start(self) -> None:
        self.ctl("-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-m", mode, "stop")


@contextmanager
def private_postgres():
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        if os.environ.get("AIGC_REQUIRE_POSTGRES"):
            pytest.fail("AIGC_REQUIRE_POSTGRES is set but no PostgreSQL server binaries are installed")
        pytest.skip("no PostgreSQL server binaries (Debian: postgresql)")
    data = Path(tempfile.mkdtemp(prefix="aigc-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run as the postgres user
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = PrivatePostgres(bins[-1].parent, data, free_port(), as_user)
    subprocess.run([*as_user, str(pg.bin / "initdb"), "-D", str(data / "data"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(data, ignore_errors=True)


# ---------------------------------------------------------------- a private Redis server

@contextmanager
def private_redis():
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("AIGC_REQUIRE_REDIS"):
            pytest.fail("AIGC_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("no redis-server (Debian: redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        wait_for(lambda: client.ping(), "redis-server to answer", timeout=30, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
