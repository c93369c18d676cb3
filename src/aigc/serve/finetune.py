"""Fine-tuning jobs (OpenAI's ``/v1/fine_tuning/jobs``): uploaded files in, a tenant's own ``ft:`` model out.

A job is created by the route (after the key, role and model checks, the file checks, the tenant's limit on
unfinished jobs, and a hold on its worst case: the training data's tokens times the epochs asked for, at the base
model's ``per_1k_train_tokens``). ``FineTuner`` then runs it on its own queue, ``fine_tune_workers`` at a time:

- the job's data folder is built from the prepared files (data/chat.py did the cleaning at upload);
- training is ``aigc train text`` in a separate process (the server never imports training code, and a job's
  memory is returned when it ends); its ``metrics.jsonl`` is read as it grows and becomes the job's events;
- cancelling stops the process with SIGTERM (the loop stops at the step boundary);
- the end settles the job once: the tokens actually trained on are charged, the hold released, the job's status,
  its audit entry and its last event committed in the same transaction; a succeeded job's model is served at once
  as ``ft:BASE:ORG:SUFFIX:ID``, visible to that tenant's keys only.

Jobs left unfinished by a stopped server process on this host are failed when a server starts here, their holds
released (the same rule as music and video jobs, ``serve/jobs.py``).
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from aigc.config import load_yaml
from aigc.db import audit, crud
from aigc.db.crud import Units
from aigc.db.models import utcnow

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "text"
# The built-in recipe each method starts from (its loop settings); the job's own choices override them.
RECIPES = {("supervised", "lora"): "sft-smollm2-lora", ("supervised", "full"): "sft-smollm2",
           ("dpo", "lora"): "dpo-smollm2", ("dpo", "full"): "dpo-smollm2"}
TASK = {"supervised": "sft", "dpo": "dpo"}
FILE_KIND = {"supervised": "chat", "dpo": "preference"}
AUTO_EPOCHS = 3
ENDPOINT = "fine_tuning.jobs"


def base_lr(method: str, finetuning_type: str) -> float:
    """The learning rate of the method's recipe (a full DPO takes a tenth of the LoRA one)."""
    lr = float(load_yaml(CONFIGS / f"{RECIPES[(method, finetuning_type)]}.yaml")["train"]["lr"])
    return lr / 10 if (method, finetuning_type) == ("dpo", "full") else lr


def model_name(base: str, org: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, ``ft:BASE:ORG:SUFFIX:ID`` (an empty suffix leaves ``::``)."""
    org_slug = re.sub(r"[^a-z0-9-]+", "-", org.lower()).strip("-") or "org"
    return f"ft:{base}:{org_slug}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the server process dies (Linux), so a killed server leaves no training behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Plan:
    """What the worker needs to run one job."""

    job_id: str
    org_id: int
    key_id: int | None
    org_name: str
    model: str
    version: str
    folder: Path  # HOME/fine_tuning/<job id>: data/, run/, train.log
    data: list[Path]  # the prepared training file, and the validation file's when there is one
    args: list[str]  # the `aigc train text` command line after the recipe
    tokens_per_epoch: int
    n_epochs: int
    suffix: str | None
    held: int
    kind: str = "chat"
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Payer:
    org_id: int
    key_id: int | None


class FineTuner:
    def __init__(self, service, workers: int = 1):
        self.service = service
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="aigc-finetune")
        self.running: dict[str, Plan] = {}
        self.lock = threading.Lock()
        self.poll_s = 0.5

    # ------------------------------------------------------------ start-up

    def serve_finished(self) -> int:
        """Serve every tenant's fine-tuned models not served here yet (at start, and as other servers finish jobs)."""
        s = self.service
        with s.sessions() as db:
            done = [(j.fine_tuned_model, j.run_dir, j.org_id, j.org_name) for j in _with_org(db, crud.fine_tuned_models(db))
                    if j.fine_tuned_model not in s.registry.entries]
        added = 0
        for model_id, run_dir, org_id, org_name in done:
            if run_dir and Path(run_dir).is_dir():
                self._register(model_id, Path(run_dir), org_id, org_name)
                added += 1
        return added

    def fail_orphans(self, live: set[str]) -> int:
        """Fail the jobs whose server is no longer alive and release their holds (once, by whichever server gets there)."""
        s = self.service
        with s.sessions() as db:
            left = [(j.id, j.org_id, j.key_id, j.model, j.model_version, j.held) for j in crud.unfinished_fine_tunes(db)
                    if j.owner not in live]
        for job_id, org_id, key_id, model, version, held in left:
            self._settle(job_id, _Payer(org_id, key_id), model, version, held, "failed", 0, 0.0,
                         error={"code": "server_stopped", "message": "the server stopped before the job finished", "param": None})
        if left:
            log.warning("failed unfinished fine-tuning jobs", extra={"jobs": len(left)})
        return len(left)

    # ------------------------------------------------------------ the queue

    def submit(self, plan: Plan) -> None:
        self.pool.submit(self._run, plan)

    def cancel(self, job_id: str) -> bool:
        """Stop a job: a queued one is settled here (nothing trained); a running one of this process is stopped and
        settles when its process has ended. False when it had already finished."""
        with self.service.sessions() as db:
            job = crud.get_fine_tune(db, job_id, None)
            payer, model, version, held = _Payer(job.org_id, job.key_id), job.model, job.model_version, job.held
        with self.service.billing.engine.begin() as conn:
            if crud.update_fine_tune(conn, job_id, status="cancelled", only_if=("queued", "validating_files")):
                crud.add_event(conn, job_id, "Fine-tuning job cancelled before it started")
                queued = True
            else:
                queued = False
                if not crud.update_fine_tune(conn, job_id, status="cancelled", only_if=("running",)):
                    return False
                crud.add_event(conn, job_id, "Cancelling the job: training stops at the next step")
        if queued:
            self._settle(job_id, payer, model, version, held, "cancelled", 0, 0.0)
            return True
        with self.lock:
            plan = self.running.get(job_id)
        if plan is not None:
            plan.cancelled.set()
        return True

    def _run(self, plan: Plan) -> None:
        try:
            self._train(plan)
        except Exception:  # never lost: the job is failed and its hold released
            log.exception("fine-tuning job failed", extra={"job": plan.job_id})
            self._settle(plan.job_id, _Payer(plan.org_id, plan.key_id), plan.model, plan.version, plan.held, "failed", 0, 0.0,
                         error={"code": "internal_error", "message": "internal error while running the job", "param": None})

    def _train(self, plan: Plan) -> None:
        from aigc.data.chat import combine_prepared

        s = self.service
        with s.billing.engine.begin() as conn:
            if not crud.update_fine_tune(conn, plan.job_id, status="running", started_at=utcnow(), only_if=("queued",)):
                return  # cancelled while queued (and settled then)
            crud.add_event(conn, plan.job_id, "Fine-tuning job started")
        with self.lock:
            self.running[plan.job_id] = plan
        try:
            data = plan.folder / "data"
            if len(plan.data) == 2:
                combine_prepared(plan.data[0], plan.data[1], data, plan.kind)
            else:
                shutil.copytree(plan.data[0], data)
            run = plan.folder / "run"
            outcome = self._process(plan, data, run)
        finally:
            with self.lock:
                self.running.pop(plan.job_id, None)
        status, epochs, compute_s, error, summary = outcome
        trained = int(round(plan.tokens_per_epoch * min(epochs, plan.n_epochs)))
        payer = _Payer(plan.org_id, plan.key_id)
        model_id = None
        if status == "succeeded":
            model_id = model_name(plan.model, plan.org_name, plan.suffix, plan.job_id)
            self._register(model_id, run, plan.org_id, plan.org_name)
        self._settle(plan.job_id, payer, plan.model, plan.version, plan.held, status, trained, compute_s, error=error,
                     model_id=model_id, run_dir=str(run), metrics=summary)

    def _process(self, plan: Plan, data: Path, run: Path) -> tuple[str, float, float, dict | None, dict | None]:
        """Train in a child process, turning its metrics into events: (status, epochs done, seconds, error, summary)."""
        s = self.service
        cmd = [sys.executable, "-m", "aigc", "train", "text", plan.args[0], "--data", str(data), "--run", str(run), "--json",
               *plan.args[1:]]
        logfile = plan.folder / "train.log"
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with logfile.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent, start_new_session=True)
            tail = _Tail(run / "metrics.jsonl")
            last_check, epochs = 0.0, 0.0
            while True:
                finished = proc.poll() is not None
                for record in tail.read():
                    epochs = max(epochs, float(record.get("epoch", 0.0)))
                    self._metric_event(plan, record)
                if finished:
                    break
                now = time.monotonic()
                if now - last_check > 1.0:  # a cancel from another server process reaches this one through the database
                    last_check = now
                    with s.sessions() as db:
                        if crud.get_fine_tune(db, plan.job_id, None).status == "cancelled":
                            plan.cancelled.set()
                if plan.cancelled.is_set() and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    continue
                time.sleep(self.poll_s)
        compute_s = time.perf_counter() - t0
        if plan.cancelled.is_set():
            return "cancelled", epochs, compute_s, None, None
        if proc.returncode != 0:
            return "failed", epochs, compute_s, {"code": "training_failed", "message": _last_error(logfile), "param": None}, None
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        return "succeeded", float(summary.get("epochs", epochs)), compute_s, None, summary

    def _metric_event(self, plan: Plan, r: dict) -> None:
        step = int(r["step"])
        total = max(step, round(step * plan.n_epochs / r["epoch"])) if r.get("epoch") else None
        data = {"step": step, "train_loss": r.get("loss"), "total_steps": total, "epoch": r.get("epoch")}
        message = f"Step {step}" + (f"/{total}" if total else "") + f": training loss={r['loss']:.4f}"
        if "val_loss" in r:
            data["valid_loss"] = r["val_loss"]
            message += f", validation loss={r['val_loss']:.4f}"
        with self.service.billing.engine.begin() as conn:
            crud.add_event(conn, plan.job_id, message, type="metrics", data=data)

    # ------------------------------------------------------------ the end

    def _register(self, model_id: str, run: Path, org_id: int, org_name: str) -> None:
        from aigc.serve.registry import entry_for

        entry = entry_for(run, model_id)
        entry.org_id, entry.owned_by = org_id, org_name
        self.service.registry.add(entry)

    def _settle(self, job_id: str, payer: _Payer, model: str, version: str, held: int, status: str, trained: int,
                compute_s: float, error: dict | None = None, model_id: str | None = None, run_dir: str | None = None,
                metrics: dict | None = None) -> None:
        """Charge the tokens trained on, release the hold, finish the job and audit it: one transaction, once."""
        s = self.service
        price = s.billing.price(model, version)
        message = {"succeeded": f"New fine-tuned model created: {model_id}. The job has successfully completed",
                   "cancelled": "The job was cancelled", "failed": f"The job failed: {(error or {}).get('message', '')}"}[status]
        with s.billing.engine.begin() as conn:
            values = {"finished_at": utcnow(), "trained_tokens": trained, "error": error}
            if status != "cancelled":
                values["status"] = status
            if model_id:
                values.update(fine_tuned_model=model_id, run_dir=run_dir, metrics=metrics)
            if not crud.update_fine_tune(conn, job_id, unsettled=True, **values):
                return  # settled already
            usage = "ok" if status == "succeeded" else "cancelled" if status == "cancelled" else "error"
            done = crud.settle(conn, job_id, payer, model, version, ENDPOINT, usage, Units(train_tokens=trained), price, held,
                               compute_s, s.billing.cost_per_s)
            crud.add_event(conn, job_id, message, level="error" if status == "failed" else "info")
            audit.append(conn, f"fine_tune.{status}", "server", payer.org_id, f"fine_tune:{job_id}",
                         {"model": model, "fine_tuned_model": model_id, "trained_tokens": trained, "charged": done.charged,
                          "error": error})

    def close(self) -> None:
        with self.lock:
            plans = list(self.running.values())
        for plan in plans:  # stop training at the next step; each settles as cancelled
            plan.cancelled.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _with_org(db, jobs: list) -> list:
    from aigc.db.models import Organization

    names = dict(db.execute(select(Organization.id, Organization.name)).all())
    for j in jobs:
        j.org_name = names.get(j.org_id, "org")
    return jobs


def _last_error(logfile: Path) -> str:
    """The training command's own one-line error (``error: ...``), else its last line."""
    lines = [ln.strip() for ln in logfile.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    text = errors[-1].removeprefix("error:").strip() if errors else (lines[-1] if lines else "the training process failed")
    return text[:1000]


class _Tail:
    """New complete lines of a JSONL file that another process appends to."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in chunk[: end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def epochs_of(n_epochs) -> int:
    return AUTO_EPOCHS if n_epochs in (None, "auto") else int(n_epochs)


def steps_estimate(examples: int, batch: int, epochs: int) -> int:
    return max(1, math.ceil(examples * epochs / batch))
