"""This server process among the others on one database: its lease, what a dead one leaves behind, and the changes
every process must hear at once.

- **Lease.** Each server process registers a row in ``servers`` and renews its heartbeat every ``heartbeat_s``.
  Its requests' holds are kept per server (``server_holds``); its jobs name it as their owner.
- **Reaping.** At every heartbeat a server looks for servers whose lease (``lease_s``) has expired, or whose process
  on this host is gone, on any host: it deletes their rows (a conditional DELETE: one winner), releases what their
  requests in flight held, fails their music, video and fine-tuning jobs and releases those holds. A killed worker
  so leaks nothing, whichever host it ran on, and a server paused past its lease finds its row gone and registers
  again (what it then settles releases nothing twice: ``crud.untrack_hold``).
- **Changes.** On PostgreSQL a dedicated connection LISTENs for the NOTIFYs that ``crud.announce`` sends when a key is
  revoked, a plan or price changes, a policy changes or an output is taken down (by any server or the CLI): every
  process drops that cache at once. The caches' own lifetimes (``key_cache_s`` and the like) stay the fallback
  while the listener reconnects. SQLite serves one process, which drops its caches itself.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading

from aigc.db import crud

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Fleet:
    def __init__(self, service):
        self.service = service
        settings = service.settings
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self.heartbeat_s, self.lease_s = settings.heartbeat_s, settings.lease_s
        self.engine = service.sessions.kw["bind"]
        self.postgres = self.engine.dialect.name == "postgresql"
        self.listening = threading.Event()  # set while the NOTIFY listener is connected
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sweep_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Register, clean up after the dead, then keep the lease and listen (background threads)."""
        with self.engine.begin() as conn:
            crud.register_server(conn, self.id, self.host, self.pid)
        self.service.billing.server = self.id
        self.sweep()
        self._threads = [threading.Thread(target=self._beat, name="aigc-fleet", daemon=True)]
        if self.postgres:
            self._threads.append(threading.Thread(target=self._listen, name="aigc-listen", daemon=True))
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """At a clean stop, after the requests and jobs have settled: leave the fleet (releasing anything still held)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        try:
            with self.engine.begin() as conn:
                crud.reap_server(conn, self.id, None)
                crud.release_orphan_holds(conn)
        except Exception:  # the database is gone: the others reap this server when its lease expires
            log.warning("could not leave the fleet cleanly", exc_info=True)

    # ------------------------------------------------------------ lease and reaping

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.engine.begin() as conn:
                    if not crud.heartbeat(conn, self.id):
                        log.error("this server's lease was taken for expired (a pause longer than the lease?): "
                                  "its holds were released and its jobs failed; registering again", extra={"server": self.id})
                        crud.register_server(conn, self.id, self.host, self.pid)
                self.sweep()
                self.service.metrics.refresh()  # this worker's gauges, for whichever worker answers /metrics
            except Exception:  # the database restarting, say: tried again at the next beat
                log.warning("fleet heartbeat failed", exc_info=True)

    def dead(self, conn) -> list[tuple[str, bool]]:
        """(server id, whether its lease expired) of the servers to reap: lease expired, or a process of this host gone."""
        expired = set(crud.expired_servers(conn, self.lease_s))
        out = []
        for sid, host, pid in crud.servers(conn):
            if sid == self.id:
                continue
            if host == self.host and not _alive(pid):
                out.append((sid, False))
                self.service.metrics.process_dead(pid)
            elif sid in expired:
                out.append((sid, True))
        return out

    def sweep(self) -> dict:
        """Reap dead servers: their rows, the holds of their requests in flight, their jobs. What was done, counted."""
        s = self.service
        with self._sweep_lock:
            with self.engine.begin() as conn:
                reaped = [sid for sid, expired in self.dead(conn) if crud.reap_server(conn, sid, self.lease_s if expired else None)]
                released = crud.release_orphan_holds(conn)
                live = crud.live_servers(conn)
            jobs = s.jobs.fail_orphans(live)
            fine_tunes = s.fine_tunes.fail_orphans(live)
            s.fine_tunes.serve_finished()  # models other servers fine-tuned
            s.limiter.purge()
        if reaped or released:
            log.warning("reaped stopped servers", extra={"servers": reaped, "released": sum(released.values()), "jobs": jobs,
                                                         "fine_tunes": fine_tunes})
        return {"servers": reaped, "released": released, "jobs": jobs, "fine_tunes": fine_tunes}

    # ------------------------------------------------------------ changes

    def _listen(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {crud.CHANNEL}")
                    self.listening.set()
                    self.service.forget_all()  # whatever changed while nobody listened
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._heard(note.payload)
            except Exception:
                if self._stop.is_set():
                    break
                log.warning("the change listener lost its connection; reconnecting", exc_info=True)
            finally:
                self.listening.clear()
            self._stop.wait(1.0)

    def _heard(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            self.service.forget(note["kind"], note.get("org"))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed change notice", extra={"payload": payload[:200]})
