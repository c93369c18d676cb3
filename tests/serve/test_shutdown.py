"""`aigc serve` as a real process: SIGTERM under load finishes in-flight requests and loses no usage record."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import select

from aigc.db.models import UsageRecord
from conftest import wait_for
from tests.serve.conftest import seed_billing
from tests.serve.helpers import db, free_port, tenant


def test_sigterm_under_load_loses_nothing(tmp_path, text_model):
    from aigc.settings import Settings

    settings = Settings(home=tmp_path / "home")
    sessions = db(settings)
    seed_billing(sessions)
    _, key = tenant(sessions, "acme", "payg")
    port = free_port()
    env = {**os.environ, "AIGC_HOME": str(settings.home)}
    proc = subprocess.Popen([sys.executable, "-m", "aigc.cli", "serve", f"rand={text_model}", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, f"aigc serve to answer {url}/readyz", timeout=180, proc=proc)
        body = {"model": "rand", "prompt": "x", "max_tokens": 100, "temperature": 0}

        def one(i):
            try:
                r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None
            except httpx.HTTPError as exc:
                return type(exc).__name__, None

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            time.sleep(1.0)  # requests are in flight (the model loads on the first one)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), stderr[-2000:]  # uvicorn re-raises the signal after a clean shutdown
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == 12, results  # every request in flight at SIGTERM completed
    with sessions() as s:
        records = s.scalars(select(UsageRecord).where(UsageRecord.endpoint == "completions")).all()
    assert len(records) == len(ok) and all(r.status == "ok" for r in records)
    assert sorted(r.output_tokens for r in records) == sorted(t for _, t in ok)
    assert '"msg": "server stopped"' in stderr  # JSON logs, and the lifespan shutdown ran
