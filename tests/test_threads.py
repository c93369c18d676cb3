"""The CPU thread policy: threads follow the free CPU, an explicit setting wins, the load is measured for real."""
import subprocess
import sys
import time

import pytest
import torch

from aigc import threads


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    torch.set_num_threads(1)  # the suite's fixed count (conftest)
    threads._policy = None


@pytest.mark.parametrize("cores, other, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.33, 1), (2, 2.0, 1),
                                                    (16, 0.3, 16), (16, 8.5, 8), (16, 15.9, 1), (1, 0.0, 1)])
def test_choose_takes_the_free_cores(cores, other, expected):
    assert threads.choose(cores, other) == expected


class FakeMeter:
    def __init__(self, readings):
        self.readings = list(readings)

    def window(self):
        return 1.0

    def others(self):
        return self.readings.pop(0)


def test_adapt_follows_the_load_in_the_calling_thread(monkeypatch):
    monkeypatch.delenv("AIGC_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: [0, 1])
    policy = threads.ThreadPolicy(meter=FakeMeter([0.0, 1.4, 1.3, 0.1]), interval=0.0)
    assert policy.start().threads == 2 and torch.get_num_threads() == 2 and policy.plan.reason == "idle machine"
    assert policy.adapt().threads == 1 and torch.get_num_threads() == 1  # a busy process appeared
    assert "1.4 of 2 cores busy elsewhere" in policy.plan.reason
    assert policy.adapt() is None and torch.get_num_threads() == 1  # still busy: no change
    assert policy.adapt().threads == 2 and torch.get_num_threads() == 2  # it went away
    slow = threads.ThreadPolicy(meter=FakeMeter([0.0, 2.0]), interval=3600)
    slow.start()
    assert slow.adapt() is None and slow.plan.threads == 2  # measures again only every `interval` seconds


def test_an_explicit_setting_wins(monkeypatch):
    monkeypatch.setenv("AIGC_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    plan = threads.configure()
    assert (plan.threads, plan.reason) == (3, "AIGC_THREADS=3") and torch.get_num_threads() == 3
    assert threads.adapt() is None and torch.get_num_threads() == 3  # never adapted
    assert threads.configure(requested=2).reason == "set by the config (2)"  # --train.threads beats the environment
    monkeypatch.delenv("AIGC_THREADS")
    assert threads.configure().reason == "OMP_NUM_THREADS=5"


def test_the_meter_sees_a_busy_process():
    meter = threads.LoadMeter(threads.usable_cores())
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        meter.others()  # a window that starts with the spinner running
        time.sleep(1.0)
        busy = meter.others()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy > 0.6  # one spinning process: about a core (less when this machine is crowded)
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # this process's own work is not counted as load
        pass
    assert meter.others() < busy
