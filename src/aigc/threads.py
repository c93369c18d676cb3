"""CPU threads: how many intra-op threads torch uses, chosen from the CPU that is free right now.

Why not torch's default: it starts one OpenMP thread per core, and those threads spin while they wait
at each operator's barrier. Beside one other busy process on a 2-core machine that collapses: each
barrier waits for a thread the scheduler has parked, and training ran at a quarter of its idle speed
while one thread kept about half (``benchmarks/contention.py`` measures both). So:

- **the thread count follows the free CPU**: the cores this process may use, less what other
  processes used over the last few seconds (``/proc/stat`` for those cores, less this process's own
  time). All cores on an idle machine, fewer beside a busy one; loops call ``adapt()`` and it
  measures again every ``INTERVAL_S`` seconds, so a job follows the load as it comes and goes;
- **OpenMP threads spin only briefly** before they sleep (``GOMP_SPINCOUNT``, set in
  ``aigc/__init__`` because libgomp reads it when torch loads): as fast as the default on an idle
  machine, and a team whose thread was parked between two measurements does not burn the core
  it shares.

An explicit setting always wins and turns adaptation off: ``--train.threads=N`` (a loop's own
setting), then ``AIGC_THREADS``, then ``OMP_NUM_THREADS`` (which torch itself reads).

torch keeps the thread count per thread (an OpenMP setting), so ``adapt()`` must be called by the
thread that computes: the training loop, the server's decode worker, a job worker.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

INTERVAL_S = 3.0  # how often adapt() measures the load again
MIN_WINDOW_S = 0.25  # the shortest window a first choice is made from



@dataclass
class Plan:
    threads: int
    cores: int
    other_busy: float | None  # cores' worth of CPU other processes used in the last window (None: not measured)
    reason: str

    def to_dict(self) -> dict:
        return {"threads": self.threads, "cores": self.cores,
                "other_busy": None if self.other_busy is None else round(self.other_busy, 2), "reason": self.reason}


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask), capped by a cgroup CPU quota."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    quota = _cgroup_quota()
    if quota is not None and quota < len(cpus):
        cpus = cpus[: max(1, int(quota + 0.5))]
    return cpus


def _cgroup_quota() -> float | None:
    try:
        text = open("/sys/fs/cgroup/cpu.max").read().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose(cores: int, other_busy: float) -> int:
    """Threads for ``cores`` usable cores when others use ``other_busy`` cores' worth: the free ones, at least one."""
    return max(1, min(cores, int(cores - other_busy + 0.5)))


class LoadMeter:
    """CPU used by other processes on our cores between two readings, in cores."""

    def __init__(self, cpus: list[int]):
        self.cpus = set(cpus)
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(monotonic time, busy seconds of our cores, this process's CPU seconds), None where /proc/stat is absent."""
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) in self.cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                busy += user + nice + system + irq + softirq + steal  # steal: the hypervisor gave the core away
        t = os.times()
        return time.monotonic(), busy / self.tick, t.user + t.system

    def window(self) -> float:
        return 0.0 if self.last is None else time.monotonic() - self.last[0]

    def others(self) -> float | None:
        """Cores' worth of CPU others used since the last call (then starts a new window)."""
        now = self._read()
        if now is None or self.last is None or now[0] - self.last[0] <= 0:
            self.last = now
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def explicit_threads(requested: int = 0) -> tuple[int, str] | None:
    """The thread count someone set, and where: a loop's own setting, AIGC_THREADS, OMP_NUM_THREADS."""
    if requested:
        return requested, f"set by the config ({requested})"
    from aigc.settings import Settings

    settings = Settings()
    configured = settings.threads
    if configured:
        return configured, f"AIGC_THREADS={configured}"
    omp = settings.omp_num_threads.strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    return None


class ThreadPolicy:
    """The process's thread count: fixed where someone set it, else following the free CPU."""

    def __init__(self, requested: int = 0, meter: LoadMeter | None = None, interval: float = INTERVAL_S):
        self.cpus = usable_cores()
        self.interval = interval
        self.fixed = explicit_threads(requested)
        self.meter = None if self.fixed else (meter or LoadMeter(self.cpus))
        self.plan = Plan(len(self.cpus), len(self.cpus), None, "not measured yet")
        self.next_check = 0.0
        self.lock = threading.Lock()

    def start(self) -> Plan:
        """The first choice, from a window of at least MIN_WINDOW_S (the meter's age, often the imports' time)."""
        if self.fixed:
            threads, reason = self.fixed
            self.plan = Plan(threads, len(self.cpus), None, reason)
        else:
            wait = MIN_WINDOW_S - self.meter.window()
            if wait > 0:
                time.sleep(wait)
            self._measure()
        self._apply()
        return self.plan

    def _measure(self) -> None:
        other = self.meter.others()
        cores = len(self.cpus)
        if other is None:
            self.plan = Plan(cores, cores, None, "no load reading on this system: all cores")
        else:
            threads = choose(cores, other)
            self.plan = Plan(threads, cores, other, f"{other:.1f} of {cores} cores busy elsewhere" if other >= 0.05 else "idle machine")
        self.next_check = time.monotonic() + self.interval

    def adapt(self) -> Plan | None:
        """Measure again when due; apply the plan to the calling thread. Returns the plan when it changed."""
        changed = None
        if self.meter is not None and time.monotonic() >= self.next_check:
            with self.lock:
                if time.monotonic() >= self.next_check:
                    before = self.plan.threads
                    self._measure()
                    if self.plan.threads != before:
                        changed = self.plan
                        log.info("threads %d -> %d (%s)", before, self.plan.threads, self.plan.reason)
        self._apply()
        return changed

    def _apply(self) -> None:
        import torch

        if torch.get_num_threads() != self.plan.threads:
            torch.set_num_threads(self.plan.threads)


_policy: ThreadPolicy | None = None
_meter_at_import = None


def configure(requested: int = 0) -> Plan:
    """Set this process's thread policy (a loop's own ``threads`` setting, 0: none) and apply its first choice."""
    global _policy
    meter = None
    if _meter_at_import is not None and not explicit_threads(requested):
        meter = _meter_at_import  # its window started when aigc was imported: the choice needs no extra wait
    _policy = ThreadPolicy(requested, meter=meter)
    return _policy.start()


def adapt() -> Plan | None:
    """Follow the load: cheap to call every step (it measures every INTERVAL_S); a no-op before configure()."""
    return _policy.adapt() if _policy is not None else None


def current() -> Plan | None:
    return _policy.plan if _policy is not None else None


def _start_meter() -> None:
    """Called once from aigc/__init__: the first window opens when the package is imported."""
    global _meter_at_import
    try:
        _meter_at_import = LoadMeter(usable_cores())
    except (OSError, ValueError):
        _meter_at_import = None
