"""The console's pages: server-rendered (Jinja2), one route per page, each checking the role and the tenant itself.

Reading is done here with the same crud and records functions the API uses. Everything that changes something
(generating, uploading, starting or cancelling a job, keys, review decisions) is the browser calling the ``/v1`` API
itself with the session cookie and the CSRF header (``deps.get_principal``): the console cannot do what the API
would refuse, and there is one implementation of each action. The few form posts of the console's own (sign in, sign
out, password, language) carry the CSRF token as a form field.
"""
from __future__ import annotations

import csv
import datetime as dt
import hmac
import io
import json
import re
import secrets
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from aigc.db import audit as audit_log
from aigc.db import crud
from aigc.db.models import ROLES, ApiKey, File, FineTuneJob, Generation, Organization, UsageRecord, User
from aigc.govern import records
from aigc.serve.console.i18n import LANGS, pick, t
from aigc.serve.deps import (ANY_ROLE, GENERATE, READ_USAGE, SESSION_COOKIE, ConsoleUser, ServiceDep, console_user)
from aigc.serve.service import Service

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)

LANG_COOKIE = "aigc_lang"
LOGIN_CSRF = "aigc_login_csrf"
REVIEW = ("admin", "reviewer")
# (page, label, tenant roles that see it, whether the operator sees it)
NAV = (("playground", "playground", GENERATE, False), ("models", "models", ANY_ROLE, True),
       ("training", "training", READ_USAGE, False), ("usage", "usage", READ_USAGE, True),
       ("keys", "keys", ("admin",), False), ("review", "review", REVIEW, True), ("audit", "audit", (), True))

LANDING = {"admin": "playground", "developer": "playground", "viewer": "usage", "reviewer": "review"}  # each role's first page


class PageError(Exception):
    def __init__(self, status: int, key: str):
        self.status, self.key = status, key


class SignIn(Exception):
    """No live session: to the sign-in page (and back here afterwards)."""

    def __init__(self, expired: bool = False):
        self.expired = expired


def may(cu: ConsoleUser, page: str) -> bool:
    for name, _, roles, operator in NAV:
        if name == page:
            return operator if cu.principal.operator else cu.principal.role in roles
    return False


def lang_of(request: Request) -> str:
    return pick(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))


async def signed_in(request: Request, service: ServiceDep) -> ConsoleUser:
    cu = await console_user(request, service)
    if cu is None:
        raise SignIn(expired=SESSION_COOKIE in request.cookies)
    return cu


User_ = Annotated[ConsoleUser, Depends(signed_in)]


def page(cu: ConsoleUser, name: str) -> None:
    if not may(cu, name):
        raise PageError(403, "forbidden")


def render(request: Request, cu: ConsoleUser | None, name: str, code: int = 200, **ctx) -> HTMLResponse:
    lang = lang_of(request)
    nav = [(p, label) for p, label, _, _ in NAV if cu is not None and may(cu, p)]
    return templates.TemplateResponse(request, name, {"cu": cu, "lang": lang, "langs": LANGS, "nav": nav,
                                                      "t": lambda key: t(lang, key), "csrf": cu.csrf if cu else "",
                                                      "here": request.url.path, **ctx}, status_code=code)


async def page_error(request: Request, exc: PageError) -> HTMLResponse:
    cu = await console_user(request, request.app.state.service)
    return render(request, cu, "error.html", code=exc.status, message_key=exc.key)


async def sign_in_redirect(request: Request, exc: SignIn) -> Response:
    if request.headers.get("hx-request") or request.url.path.endswith("/stream"):
        return Response(status_code=401)
    dest = f"/console/login?next={request.url.path}" + ("&expired=1" if exc.expired else "")
    return RedirectResponse(dest, status_code=303)


def _db(service: Service, fn, *args):
    """A read in a worker thread (the event loop never waits on the database)."""
    def work():
        with service.sessions() as s:
            return fn(s, *args)
    return anyio.to_thread.run_sync(work)


def _models(service: Service, cu: ConsoleUser, kinds: tuple[str, ...] | None = None) -> list:
    p = cu.principal
    out = []
    for e in service.registry.entries.values():
        if not e.visible_to(None if p.operator else p.org_id):
            continue
        if p.allowed_models is not None and e.id not in p.allowed_models:
            continue
        if kinds is None or e.kind in kinds:
            out.append(e)
    return sorted(out, key=lambda e: (e.kind, e.id))


# ---------------------------------------------------------------- sign-in, sign-out, language


@router.get("/")
async def root():
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
async def home(request: Request, service: ServiceDep):
    cu = await console_user(request, service)
    if cu is None:
        return RedirectResponse("/console/login", status_code=303)
    first = "audit" if cu.principal.operator else LANDING.get(cu.principal.role, "models")
    return RedirectResponse(f"/console/{first}", status_code=303)


def _safe_next(nxt: str | None) -> str:
    return nxt if nxt and nxt.startswith("/console/") and not nxt.startswith("//") and "\\" not in nxt else "/console"


@router.get("/console/login")
async def login_page(request: Request, next: str | None = None, expired: bool = False, failed: bool = False):
    token = secrets.token_urlsafe(24)
    resp = render(request, None, "login.html", login_csrf=token, next=_safe_next(next), expired=expired, failed=failed)
    resp.set_cookie(LOGIN_CSRF, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                    path="/console/login")
    return resp


def _authenticate(service: Service, secret: str, email: str, password: str) -> tuple[str, str] | None:
    """(cookie token, CSRF token) of a new session, or None when nothing matched."""
    token = service.settings.admin_token
    with service.sessions.begin() as s:
        crud.purge_console_sessions(s, dt.timedelta(minutes=service.settings.console_idle_minutes))
        if secret:
            if token and hmac.compare_digest(secret.encode(), token.encode()):
                return crud.create_console_session(s, None, None, None, "operator")
            p = crud.lookup_key(s, secret) if secret.startswith(crud.KEY_PREFIX) and len(secret) <= 128 else None
            if p is None or p.revoked or (p.expires_at is not None and p.expires_at <= crud.utcnow()):
                return None
            return crud.create_console_session(s, p.org_id, p.user_id, p.key_id, f"key:{p.key_prefix}")
        matches = [u for u, _ in crud.users_by_email(s, email)] if email else []
        hit = [u for u in matches if crud.password_matches(password, u.password_hash)]
        if not matches:
            crud.password_matches(password, None)  # the same time for an unknown e-mail
        if len(hit) != 1:
            return None
        return crud.create_console_session(s, hit[0].org_id, hit[0].id, None, f"user:{hit[0].id}")


@router.post("/console/login")
async def login(request: Request, service: ServiceDep, csrf: str = Form(""), key: str = Form(""), email: str = Form(""),
                password: str = Form(""), next: str = Form("/console")):
    cookie = request.cookies.get(LOGIN_CSRF, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), csrf.encode()):
        raise PageError(403, "csrf_failed")
    session = await anyio.to_thread.run_sync(_authenticate, service, key.strip(), email.strip(), password)
    if session is None:
        return RedirectResponse(f"/console/login?failed=1&next={_safe_next(next)}", status_code=303)
    resp = RedirectResponse(_safe_next(next), status_code=303)
    resp.set_cookie(SESSION_COOKIE, session[0], httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")
    resp.delete_cookie(LOGIN_CSRF, path="/console/login")
    return resp


def _check_form_csrf(cu: ConsoleUser, csrf: str) -> None:
    if not hmac.compare_digest(cu.csrf.encode(), csrf.encode()):
        raise PageError(403, "csrf_failed")


@router.post("/console/logout")
async def logout(request: Request, service: ServiceDep, cu: User_, csrf: str = Form("")):
    _check_form_csrf(cu, csrf)
    token = request.cookies.get(SESSION_COOKIE, "")

    def end():
        with service.sessions.begin() as s:
            crud.end_console_session(s, token)
    await anyio.to_thread.run_sync(end)
    resp = RedirectResponse("/console/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/console/lang/{code}")
async def set_lang(code: str, back: str = "/console"):
    if code not in LANGS:
        raise PageError(404, "not_found")
    resp = RedirectResponse(_safe_next(back), status_code=303)
    resp.set_cookie(LANG_COOKIE, code, samesite="strict", max_age=365 * 86400, path="/")
    return resp


# ---------------------------------------------------------------- playground


@router.get("/console/playground")
async def playground(request: Request, service: ServiceDep, cu: User_, model: str | None = None):
    page(cu, "playground")
    from aigc.generate import templates as prompt_templates

    tpls = []
    for path in sorted(prompt_templates.BUILTIN.glob("*.yaml")):
        tpl = prompt_templates.load(path.stem)
        tpls.append({"name": tpl.name, "description": tpl.description,
                     "variables": [{"name": v.name, "required": v.required, "default": v.default, "choices": v.choices,
                                    "description": v.description, "type": v.type} for v in tpl.variables.values()]})
    by_kind = {k: [e.id for e in _models(service, cu, (k,))] for k in ("text", "echo", "image", "music")}
    return render(request, cu, "playground.html", text_models=by_kind["text"] + by_kind["echo"], image_models=by_kind["image"],
                  music_models=by_kind["music"], chosen=model,
                  templates_json=json.dumps(tpls, ensure_ascii=False).replace("<", "\\u003c"))  # inside <script>: no "</script>"


@router.get("/console/api/templates/{name}/render")
async def render_template(name: str, request: Request, cu: User_):
    """A prompt template filled from the form's fields (the template's own checks, its errors as text)."""
    page(cu, "playground")
    from aigc.errors import UserError
    from aigc.generate import templates as prompt_templates

    if not re.fullmatch(r"[a-z0-9-]{1,64}", name) or not (prompt_templates.BUILTIN / f"{name}.yaml").is_file():
        raise PageError(404, "not_found")
    try:
        tpl = prompt_templates.load(name)
        fields = {k: v for k, v in request.query_params.items() if v != ""}
        return {"prompt": tpl.render(fields), "sampling": tpl.sampling}
    except UserError as exc:
        return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")


def _request_info(s, request_id: str, org_id: int | None) -> dict | None:
    q = s.query(UsageRecord).filter(UsageRecord.request_id == request_id)
    if org_id is not None:
        q = q.filter(UsageRecord.org_id == org_id)
    rec = q.first()
    if rec is None:
        return None
    q = s.query(Generation).filter((Generation.request_id == request_id) | (Generation.id == request_id))
    if org_id is not None:
        q = q.filter(Generation.org_id == org_id)
    gens = [{"id": g.id, "status": g.status, "watermark": g.watermark, "filters": g.filters or []}
            for g in q.order_by(Generation.id).limit(64).all()]
    return {"request_id": request_id, "price": rec.charged / 1e6, "compute_cost": rec.cost / 1e6, "compute_s": rec.compute_s,
            "status": rec.status, "generations": gens}


@router.get("/console/api/requests/{request_id}")
async def request_info(request_id: str, service: ServiceDep, cu: User_):
    """What a playground result shows under it: price, compute cost, its generations with watermark and filters."""
    p = cu.principal
    info = await _db(service, _request_info, request_id[:80], None if p.operator else p.org_id)
    if info is None:
        return Response(json.dumps({"error": "no such request"}), status_code=404, media_type="application/json")
    return info


@router.get("/console/generations/{generation_id}")
async def explanation_page(generation_id: str, request: Request, service: ServiceDep, cu: User_):
    p = cu.principal
    paths = {e.id: e.path for e in service.registry.entries.values() if e.path is not None}
    try:
        e = await _db(service, records.explain, generation_id[:80], None if p.operator else p.org_id, paths,
                      service.governance.keyring, False)
    except crud.NotFound:
        raise PageError(404, "not_found") from None
    return render(request, cu, "explanation.html", e=e, pretty=json.dumps(e, indent=2, ensure_ascii=False, default=str))


# ---------------------------------------------------------------- models


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None


def _metrics(run: Path, limit: int = 5000) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[-limit:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _curves(rows: list[dict]) -> dict:
    """Step, training loss and validation loss columns for uPlot (gaps as null)."""
    rows = [r for r in rows if "step" in r]
    return {"step": [r["step"] for r in rows], "loss": [r.get("loss") for r in rows], "val_loss": [r.get("val_loss") for r in rows]}


@router.get("/console/models")
async def models_page(request: Request, service: ServiceDep, cu: User_):
    page(cu, "models")
    return render(request, cu, "models.html", models=_models(service, cu),
                  fmt_time=lambda ts: dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M"))


@router.get("/console/models/{model_id:path}")
async def model_page(model_id: str, request: Request, service: ServiceDep, cu: User_):
    page(cu, "models")
    entry = next((e for e in _models(service, cu) if e.id == model_id), None)
    if entry is None:
        raise PageError(404, "not_found")
    run = entry.path
    manifest = report = summary = None
    samples, curves = "", {"step": []}
    if run is not None and run.is_dir():
        manifest = _read_json(run / "dataset" / "manifest.json")
        summary = _read_json(run / "summary.json")
        report = next((r for r in (_read_json(p) for p in sorted(run.glob("eval*/report.json"))) if r), None) or _read_json(run / "eval.json")
        samples = (run / "samples.txt").read_text(encoding="utf-8", errors="replace")[:4000] if (run / "samples.txt").is_file() else ""
        curves = _curves(await anyio.to_thread.run_sync(_metrics, run))
    return render(request, cu, "model.html", m=entry, manifest=manifest, report=report, summary=summary, samples=samples,
                  curves=json.dumps(curves), pretty=lambda x: json.dumps(x, indent=2, ensure_ascii=False, default=str))


# ---------------------------------------------------------------- training


def _training(s, org_id: int):
    files = s.query(File).filter(File.org_id == org_id).order_by(File.created_at.desc()).limit(200).all()
    jobs = s.query(FineTuneJob).filter(FineTuneJob.org_id == org_id).order_by(FineTuneJob.created_at.desc()).limit(200).all()
    return files, jobs


@router.get("/console/training")
async def training_page(request: Request, service: ServiceDep, cu: User_):
    page(cu, "training")
    files, jobs = await _db(service, _training, cu.principal.org_id)
    bases = sorted((e.id for e in _models(service, cu, ("text",))), key=lambda m: m.startswith("ft:"))  # ft: models last
    return render(request, cu, "training.html", files=files, jobs=jobs, bases=bases, can_train=cu.principal.role in GENERATE)


@router.get("/console/training/jobs")
async def jobs_fragment(request: Request, service: ServiceDep, cu: User_):
    """The jobs table's rows (htmx polls it while a job is unfinished)."""
    page(cu, "training")
    _, jobs = await _db(service, _training, cu.principal.org_id)
    return render(request, cu, "_jobs.html", jobs=jobs)


@router.get("/console/training/{job_id}")
async def job_page(job_id: str, request: Request, service: ServiceDep, cu: User_):
    page(cu, "training")
    try:
        job = await _db(service, crud.get_fine_tune, job_id[:64], cu.principal.org_id)
    except crud.NotFound:
        raise PageError(404, "not_found") from None
    return render(request, cu, "job.html", job=job, can_train=cu.principal.role in GENERATE)  # events arrive by SSE


def _job_updates(service: Service, job_id: str, org_id: int, after: int) -> tuple[str, bool, list]:
    with service.sessions() as s:
        job = crud.get_fine_tune(s, job_id, org_id)
        return job.status, job.finished_at is not None, crud.events_since(s, job_id, after)


@router.get("/console/training/{job_id}/stream")
async def job_stream(job_id: str, request: Request, service: ServiceDep, cu: User_):
    """Server-sent events: each new job event as it is written, then the job's end."""
    page(cu, "training")
    org_id = cu.principal.org_id
    try:
        await _db(service, crud.get_fine_tune, job_id[:64], org_id)
    except crud.NotFound:
        raise PageError(404, "not_found") from None

    async def events():
        resume = request.headers.get("last-event-id", "")  # a reconnecting EventSource goes on where it was
        last = int(resume) if resume.isdigit() else 0
        while True:
            status, finished, new = await anyio.to_thread.run_sync(_job_updates, service, job_id, org_id, last)
            for e in new:
                last = e.id  # events_since returns at most 1000: the rest come on the next round
                payload = {"type": e.type, "message": e.message, "level": e.level, "data": e.data or {},
                           "created_at": e.created_at.isoformat() + "Z"}
                yield f"id: {e.id}\nevent: job\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
            if finished:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if await request.is_disconnected():
                return
            yield ": keep-alive\n\n"
            await anyio.sleep(0.5)
    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})


# ---------------------------------------------------------------- usage and billing


def _usage(s, org_id: int | None, key_id: int | None, start: dt.date, end: dt.date) -> dict:
    by_day = crud.usage_report(s, ["day"], start, end, org_id, key_id)
    by_model = crud.usage_report(s, ["model"], start, end, org_id, key_id)
    by_key = crud.usage_report(s, ["key"], start, end, org_id, key_id)
    keys = {k.id: k for k in s.query(ApiKey).filter(ApiKey.org_id == org_id).all()} if org_id else {}
    for r in by_key:  # the operator's view spans tenants: their keys are shown by number
        k = keys.get(r["key"])
        r["label"] = f"{k.name or k.prefix} ({k.prefix}…)" if k else ("—" if not r["key"] else f"#{r['key']}")
    o = s.get(Organization, org_id) if org_id else None
    plan = crud.plan_out(s.get(crud.Plan, o.plan_id)) if o is not None and o.plan_id else None
    return {"by_day": by_day, "by_model": by_model, "by_key": by_key, "org": crud.org_out(s, o) if o is not None else None,
            "plan": plan}


def _window(start: str | None, end: str | None) -> tuple[dt.date, dt.date]:
    today = crud.utcnow().date()
    try:
        e = dt.date.fromisoformat(end) if end else today
        s = dt.date.fromisoformat(start) if start else e - dt.timedelta(days=29)
    except ValueError:
        raise PageError(400, "not_found") from None
    return (s, e) if s <= e else (e, s)


def _scope(cu: ConsoleUser) -> tuple[int | None, int | None]:
    p = cu.principal
    if p.operator:
        return None, None
    return p.org_id, (p.key_id if p.role == "developer" and p.key_id else None)  # a developer's key sees its own usage


@router.get("/console/usage")
async def usage_page(request: Request, service: ServiceDep, cu: User_, start: str | None = None, end: str | None = None):
    page(cu, "usage")
    s, e = _window(start, end)
    org_id, key_id = _scope(cu)
    data = await _db(service, _usage, org_id, key_id, s, e)
    days = [(s + dt.timedelta(days=i)).isoformat() for i in range((e - s).days + 1)]
    per = {r["day"]: r for r in data["by_day"]}
    chart = {"day": days, **{c: [per.get(d, {}).get(c, 0) for d in days] for c in ("requests", "revenue", "cost", "margin")}}
    totals = {c: sum(r[c] for r in data["by_model"]) for c in ("requests", "input_tokens", "output_tokens", "images", "seconds",
                                                                 "train_tokens", "revenue", "cost", "margin")}
    return render(request, cu, "usage.html", start=s.isoformat(), end=e.isoformat(), chart=json.dumps(chart), totals=totals,
                  month=e.strftime("%Y-%m"), **data)


CSV_COLUMNS = ("requests", "input_tokens", "output_tokens", "images", "seconds", "train_tokens", "list_price", "revenue",
               "compute_s", "cost", "margin")


@router.get("/console/usage.csv")
async def usage_csv(service: ServiceDep, cu: User_, start: str | None = None, end: str | None = None,
                    group_by: Annotated[str, Query(pattern="^(day|model|key|tenant)(,(day|model|key|tenant))*$")] = "day,model"):
    page(cu, "usage")
    s, e = _window(start, end)
    org_id, key_id = _scope(cu)
    groups = group_by.split(",")
    rows = await _db(service, crud.usage_report, groups, s, e, org_id, key_id)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow([*groups, *CSV_COLUMNS])
    for r in rows:
        w.writerow([*(r[g] for g in groups), *(r[c] for c in CSV_COLUMNS)])
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="usage-{s}-{e}.csv"'})


@router.get("/console/usage/statement")
async def statement(request: Request, service: ServiceDep, cu: User_, month: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$")]):
    """A month's statement for the tenant: one line per model, the fee, the total (printable)."""
    page(cu, "usage")
    if cu.principal.operator:
        raise PageError(403, "forbidden")
    first = dt.date.fromisoformat(month + "-01")
    last = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
    data = await _db(service, _usage, cu.principal.org_id, None, first, last)
    total = sum(r["revenue"] for r in data["by_model"])
    return render(request, cu, "statement.html", month=month, first=first, last=last, total=total, **data)


# ---------------------------------------------------------------- keys and users


def _keys(s, org_id: int):
    users = s.query(User).filter(User.org_id == org_id).order_by(User.id).all()
    keys = s.query(ApiKey).filter(ApiKey.org_id == org_id).order_by(ApiKey.id.desc()).all()
    return users, keys, {u.id: u.email for u in users}


@router.get("/console/keys")
async def keys_page(request: Request, service: ServiceDep, cu: User_):
    page(cu, "keys")
    users, keys, emails = await _db(service, _keys, cu.principal.org_id)
    return render(request, cu, "keys.html", users=users, keys=keys, emails=emails, roles=ROLES,
                  models=[e.id for e in _models(service, cu)], now=crud.utcnow())


@router.post("/console/users/{user_id}/password")
async def set_password(user_id: int, service: ServiceDep, cu: User_, csrf: str = Form(""), password: str = Form("")):
    """A tenant admin sets a user's password (the API has no password endpoint: passwords are for the console)."""
    page(cu, "keys")
    _check_form_csrf(cu, csrf)

    def work():
        with service.sessions.begin() as s:
            crud.ACTOR.set(f"console:{cu.who.split(' ')[0]}")
            crud.set_password(s, cu.principal.org_id, user_id, password)
    try:
        await anyio.to_thread.run_sync(work)
    except crud.NotFound:
        raise PageError(404, "not_found") from None
    except crud.UserError as exc:
        return RedirectResponse(f"/console/keys?error={str(exc)[:200]}", status_code=303)
    return RedirectResponse("/console/keys?saved=password", status_code=303)


# ---------------------------------------------------------------- review queue


def _queue(s, org_id: int | None, status: str | None):
    out = []
    for c in records.list_complaints(s, org_id, status):
        row = records.complaint_out(c)
        row["org_id"] = c.org_id
        out.append(row)
    return out[::-1]


def flagged(g: Generation) -> list[str]:
    """Why a generation needs a reviewer's eye: blocked, or a moderation stage that did more than allow it."""
    why = [] if g.status != "blocked" else ["blocked"]
    for stage, d in sorted((g.moderation or {}).items()):
        if isinstance(d, dict) and d.get("action", "allow") != "allow":
            why.append(f"{stage}: {d['action']} ({', '.join(d.get('categories') or d.get('rules') or []) or 'policy'})")
    return why


def _flagged(s, org_id: int | None, limit: int = 100) -> list[dict]:
    """The newest flagged generations (moderation is a JSON column: filtered here, the same on every database)."""
    q = s.query(Generation).filter(Generation.status != "taken_down")
    if org_id is not None:
        q = q.filter(Generation.org_id == org_id)
    complained = {c.generation_id for c in records.list_complaints(s, org_id, None) if c.generation_id}
    out = []
    for g in q.order_by(Generation.created_at.desc()).limit(2000):
        why = flagged(g)
        if why:
            out.append({"id": g.id, "created_at": g.created_at, "org_id": g.org_id, "model": g.model, "kind": g.kind,
                        "status": g.status, "why": why, "complained": g.id in complained})
            if len(out) >= limit:
                break
    return out


@router.get("/console/review")
async def review_page(request: Request, service: ServiceDep, cu: User_, status: str = "open"):
    page(cu, "review")
    if status not in ("open", "dismissed", "taken_down", "key_revoked", "all", "flagged"):
        raise PageError(404, "not_found")
    org = None if cu.principal.operator else cu.principal.org_id
    if status == "flagged":
        return render(request, cu, "review.html", complaints=[], flagged=await _db(service, _flagged, org), status=status)
    rows = await _db(service, _queue, org, None if status == "all" else status)
    return render(request, cu, "review.html", complaints=rows, flagged=None, status=status)


# ---------------------------------------------------------------- audit (operator)


def _audit(s, tenant: int | None, actor: str | None, action: str | None, verify: bool):
    rows = crud.list_audit(s, tenant, actor, action, 200)
    report = audit_log.verify(s.connection()) if verify else None
    head = audit_log.head(s.connection())
    tenants = {o.id: o.name for o in s.query(Organization).all()}
    return rows, report, head, tenants


@router.get("/console/audit")
async def audit_page(request: Request, service: ServiceDep, cu: User_, tenant: str = "", actor: str = "", action: str = "",
                     verify: bool = False):
    page(cu, "audit")
    tenant_id = int(tenant) if tenant.isdigit() else None
    rows, report, head, tenants = await _db(service, _audit, tenant_id, actor[:200] or None, action[:40] or None, verify)
    return render(request, cu, "audit.html", rows=rows, report=report, head=head, tenants=tenants, f_tenant=tenant,
                  f_actor=actor, f_action=action)
