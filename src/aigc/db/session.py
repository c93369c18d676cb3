"""Engines and sessions: SQLite (WAL, the embedded default) or PostgreSQL; schema via Alembic."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from aigc.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, busy_timeout_s: float = 30.0) -> Engine:
    """``busy_timeout_s``: how long a SQLite writer waits for another writer's lock (then "database is locked")."""
    busy_ms = int(busy_timeout_s * 1000)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process, fsync at checkpoints
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "checkout")
        def _busy(conn, _record, _proxy):  # at every checkout: a fast path may have set a shorter wait (serve.billing)
            cur = conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        # A server that is down or restarting answers within seconds (then the API says 503), never hangs a request.
        # No ping at checkout (a round trip before every transaction, three per request): a connection the server
        # dropped fails its first statement, SQLAlchemy then discards every pooled connection at once, and the
        # request answers 503 (a settle tries again); connections are also renewed after an hour.
        return create_engine(url, pool_size=20, max_overflow=20, pool_recycle=3600, pool_timeout=10,
                             connect_args={"connect_timeout": 5})
    raise UserError(f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:///PATH or postgresql+psycopg://...")


def is_locked(exc: BaseException) -> bool:
    """Whether a database error is SQLite's "database is locked" (another writer holds the file)."""
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError) and ("locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower())


def retry_locked(fn, bound_s: float):
    """``fn()``, tried again while SQLite says the database is locked, for up to ``bound_s`` seconds in all (then the
    error). A transaction must be retried whole: a WAL reader whose snapshot went stale while it waited for the write
    lock is refused at once (SQLITE_BUSY_SNAPSHOT), whatever the busy timeout."""
    import time

    deadline = time.monotonic() + bound_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_locked(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_db(url: str, upgrade: bool = True, busy_timeout_s: float = 30.0) -> sessionmaker[Session]:
    engine = make_engine(url, busy_timeout_s)
    try:
        if upgrade:
            migrate(engine)
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot open the database {engine.url.render_as_string(hide_password=True)}: {exc}") from exc
    return sessionmaker(engine, expire_on_commit=False)
