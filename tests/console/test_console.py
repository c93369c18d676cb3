"""The console end to end in a real browser (Debian's Chromium driven by Playwright) against a live server on tiny models.

Screenshots of every page are saved under ``runs/test-console/`` (or ``$AIGC_TEST_OUTPUT``) to be looked at."""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from aigc.db import crud
from conftest import wait_for
from tests.serve.helpers import db, jsonl, spell_records, start

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUT = Path(os.environ.get("AIGC_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "runs" / "test-console"))
PASSWORD = "correct horse battery"

if not Path(CHROMIUM).is_file():
    if os.environ.get("AIGC_REQUIRE_BROWSER"):
        raise RuntimeError(f"Chromium is required here (apt-get install chromium): {CHROMIUM} is missing")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def site(tmp_path_factory, text_model, image_model, music_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    OUT.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=tmp_path_factory.mktemp("console-home"), admin_token="operator-secret-token")
    sessions = db(settings)
    ids = {}
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.set_price(s, "*", input_per_1k=0.01, output_per_1k=0.02, per_image=0.004, per_1k_train_tokens=0.5)
        for name in ("acme", "globex"):
            org = crud.create_org(s, f"{name}-{uuid.uuid4().hex[:6]}", "payg")
            ids[name] = org.id
            for role in ("admin", "viewer", "reviewer"):
                user = crud.create_user(s, org.id, f"{role}@{name}.example", role)
                crud.set_password(s, org.id, user.id, PASSWORD)
                _, ids[f"{name}-{role}-key"] = crud.create_key(s, user, name=f"{role} key")
    registry = Registry.from_paths([f"rand={text_model}", f"shapes={image_model}", f"chorales={music_model}"], echo=["echo"], max_batch=4, context=128)
    live = start(settings, registry)
    live.ids = ids
    live.sessions = sessions
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        live.browser = browser
        yield live
        browser.close()
    live.stop()


def new_page(site, lang: str = "en-US"):
    ctx = site.browser.new_context(viewport={"width": 1360, "height": 900}, locale=lang, accept_downloads=True)
    ctx.set_default_timeout(30_000)
    return ctx.new_page()


def sign_in(site, page, key: str | None = None, email: str | None = None, password: str = PASSWORD):
    page.goto(site.url + "/console")
    assert "/console/login" in page.url
    if key is not None:
        page.fill("#login-key input[name=key]", key)
        page.click("#login-key button[type=submit]")
    else:
        page.fill("#login-password input[name=email]", email)
        page.fill("#login-password input[name=password]", password)
        page.click("#login-password button[type=submit]")
    page.wait_for_load_state()
    assert "/console/login" not in page.url, page.content()[:2000]


def shot(page, name: str) -> None:
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


def test_sign_in_page_and_bad_credentials(site):
    page = new_page(site)
    page.goto(site.url + "/")
    assert page.url.endswith("/console/login")
    shot(page, "01-sign-in")
    page.fill("#login-key input[name=key]", "sk-aigc-not-a-key")
    page.click("#login-key button[type=submit]")
    assert page.locator(".alert.error").is_visible()
    page.fill("#login-password input[name=email]", "admin@acme.example")
    page.fill("#login-password input[name=password]", "wrong password!")
    page.click("#login-password button[type=submit]")
    assert page.locator(".alert.error").is_visible() and "/console/login" in page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "aigc_login_csrf")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.context.close()


def test_chat_streams_and_shows_its_price_and_generation(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    session = next(c for c in page.context.cookies() if c["name"] == "aigc_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert page.url.endswith("/console/playground")
    # the server sends text a word (or at most 32 characters) at a time: a long answer arrives in several deltas
    page.select_option("#chat-form select[name=model]", "rand")
    page.fill("#chat-form textarea[name=prompt]", "Write a slogan for tea.")
    page.fill("#chat-form input[name=max_tokens]", "80")
    page.fill("#chat-form input[name=seed]", "7")
    # the answer is drawn delta by delta from the server-sent stream (each delta one change of the answer's text)
    page.evaluate("""() => { window.__changes = 0; new MutationObserver(muts => { window.__changes += muts.filter(
        m => m.target.classList && m.target.classList.contains('answer')).length; })
        .observe(document.querySelector('#chat-log'), {subtree: true, childList: true}); }""")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as resp:
        page.click("#chat-form button[type=submit]")
    assert resp.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector("#chat-info .price")
    answer = page.locator(".msg.assistant .answer").inner_text()
    assert answer.strip(), "the streamed answer is empty"
    assert len(answer) <= 32 or page.evaluate("window.__changes") >= 2  # the answer grew delta by delta as it streamed
    price = page.locator("#chat-info .price").inner_text()
    assert re.fullmatch(r"\$\d+\.\d{6}", price) and float(price[1:]) > 0
    gen = page.locator("#chat-info .gen-link").first.inner_text()
    assert gen.startswith("req_") and gen.endswith("-0")
    shot(page, "02-playground-chat")
    page.click("#chat-info .gen-link")
    page.wait_for_url(re.compile(r"/console/generations/"))
    assert "rand" in page.locator(".facts").inner_text()
    shot(page, "03-explanation")
    page.context.close()


def test_completion_from_a_template_form(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    page.click("[data-tab=completion]")
    page.select_option("#completion-form select[name=model]", "rand")
    page.select_option("#template-select", "product-description")
    page.fill("[data-var=name]", "Lumen desk lamp")
    page.fill("[data-var=category]", "lighting")
    page.fill("[data-var=features]", "dimmable, USB-C")
    page.wait_for_function("document.querySelector('#completion-form textarea[name=prompt]').value.includes('Lumen desk lamp')")
    page.fill("#completion-form input[name=max_tokens]", "24")
    page.click("#completion-form button[type=submit]")
    page.wait_for_selector("#completion-info .price")
    shot(page, "04-playground-completion")
    page.context.close()


def test_image_generation_shows_the_image_and_its_provenance(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    page.click("[data-tab=image]")
    page.fill("#image-form input[name=prompt]", "circle")
    page.click("#image-form button[type=submit]")
    page.wait_for_selector("#image-info .price")
    img = page.locator("#image-out img").first
    img.wait_for()
    assert page.evaluate("document.querySelector('#image-out img').naturalWidth") >= 256
    assert "watermark" in page.locator("#image-info").inner_text().lower()
    assert page.locator("#image-info .c2pa").inner_text() == "signed"
    shot(page, "05-playground-image")
    page.context.close()


def test_music_and_video_jobs_play_in_the_page(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    page.click("[data-tab=music]")
    page.fill("#music-form input[name=bars]", "2")
    page.click("#music-form button[type=submit]")
    page.wait_for_selector("#music-info .price", timeout=120_000)
    assert page.locator("#music-out audio").count() == 1
    page.wait_for_function("document.querySelector('#music-out audio').readyState >= 1")  # the browser loaded the WAV
    shot(page, "05b-playground-music")
    page.click("[data-tab=video]")
    page.fill("#video-form input[name=prompt]", "circle")
    page.fill("#video-form input[name=seconds]", "1")
    page.click("#video-form button[type=submit]")
    page.wait_for_selector("#video-info .price", timeout=180_000)
    assert page.locator("#video-out video").count() == 1
    assert page.locator("#video-info .c2pa").inner_text() == "signed"
    shot(page, "05c-playground-video")
    page.context.close()


def test_upload_train_watch_the_loss_and_use_the_new_model(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    page.goto(site.url + "/console/training")
    page.set_input_files("#upload-form input[type=file]", files=[{"name": "bad.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    page.click("#upload-form button[type=submit]")
    assert "JSONL" in page.locator("#upload-result .alert.error").inner_text()
    page.set_input_files("#upload-form input[type=file]",
                         files=[{"name": "spell.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(spell_records(40, 1))}])
    page.click("#upload-form button[type=submit]")
    report = page.locator("#upload-result .alert.ok")
    assert "40 read, 40 kept" in report.inner_text()
    page.wait_for_selector("#files-table code")  # the page reloads with the file listed
    shot(page, "06-training")
    page.select_option("#job-form select[name=model]", "rand")
    page.fill("#job-form input[name=n_epochs]", "4")
    page.fill("#job-form input[name=batch_size]", "1")  # 160 steps: long enough to watch
    page.fill("#job-form input[name=suffix]", "spell")
    page.click("#job-form button[type=submit]")
    page.wait_for_function("location.pathname.includes('/training/ftjob-') || document.querySelector('#job-result .alert')")
    page.wait_for_load_state()
    assert "/console/training/ftjob-" in page.url, page.locator("#job-result").inner_text()
    job_url = page.url
    # the chart fills from the job's server-sent events while it trains
    page.wait_for_function("document.querySelector('#last-step').textContent.trim() !== '—'", timeout=180_000)
    assert page.locator("#loss-chart canvas").count() >= 1
    shot(page, "07-job-running")
    # the jobs table refreshes itself (htmx) while a job is unfinished, without reloading the page
    page.goto(site.url + "/console/training")
    assert page.locator("#jobs-rows[hx-get]").count() == 1 and "running" in page.locator("#jobs-rows").inner_text()
    page.evaluate("window.__same_page = true")
    page.wait_for_function("document.querySelector('#jobs-rows').innerText.includes('succeeded')", timeout=240_000)
    assert page.evaluate("window.__same_page === true")
    page.goto(job_url)
    page.wait_for_selector("#open-playground", timeout=240_000)
    assert page.locator("#job-status").inner_text() == "succeeded"
    model = page.locator("#result-model a").inner_text()
    assert model.startswith("ft:rand:") and ":spell:" in model
    assert page.locator("#events li").count() > 3
    page.wait_for_function("document.querySelector('#last-step').textContent.trim() !== '—'")
    shot(page, "08-job-done")
    site.ft_model, site.ft_job = model, page.url.rsplit("/", 1)[1]
    page.click("#open-playground")
    page.fill("#chat-form textarea[name=prompt]", "Reverse abcdefgh.")
    page.fill("#chat-form input[name=max_tokens]", "8")
    page.click("#chat-form button[type=submit]")
    page.wait_for_selector("#chat-info .price")
    page.goto(site.url + "/console/models")
    assert model in page.locator("#models-table").inner_text()
    shot(page, "09-models")
    page.goto(site.url + f"/console/models/{model}")
    assert page.locator("#model-loss canvas").count() >= 1
    shot(page, "10-model")
    page.context.close()


def test_usage_shows_the_requests_just_made_and_exports_csv(site):
    with site.sessions() as s:
        made = sum(r["requests"] for r in crud.usage_report(s, ["model"], org_id=site.ids["acme"]))
    assert made >= 3
    page = new_page(site)
    sign_in(site, page, email="viewer@acme.example")
    page.goto(site.url + "/console/usage")
    assert int(page.locator("#total-requests").inner_text()) == made
    assert page.locator("#requests-chart canvas").count() >= 1 and page.locator("#money-chart canvas").count() >= 1
    assert "rand" in page.locator("#by-model").inner_text()
    shot(page, "11-usage")
    with page.expect_download() as dl:
        page.click("#csv")
    rows = Path(dl.value.path()).read_text().splitlines()
    assert rows[0].startswith("day,model,requests") and sum(int(r.split(",")[2]) for r in rows[1:]) == made
    page.goto(site.url + f"/console/usage/statement?month={crud.utcnow():%Y-%m}")
    assert page.locator("#statement-total").inner_text().startswith("$")
    page.context.close()


def test_viewer_cannot_see_keys_or_generate(site):
    page = new_page(site)
    sign_in(site, page, email="viewer@acme.example")
    nav = page.locator(".side nav").inner_text()
    assert "Keys" not in nav and "Playground" not in nav and "Usage" in nav
    for path in ("/console/keys", "/console/playground", "/console/audit"):
        r = page.goto(site.url + path)
        assert r.status == 403 and page.locator("#error").is_visible(), path
    # the API refuses the same to the session's cookie and CSRF token: no key made, no generation
    status = page.evaluate("""async () => { const h = {'Content-Type': 'application/json', 'X-CSRF-Token':
        document.querySelector('meta[name=csrf-token]').content};
        const k = await fetch('/v1/organization/keys', {method: 'POST', headers: h, body: JSON.stringify({user: 'viewer@acme.example'})});
        const c = await fetch('/v1/chat/completions', {method: 'POST', headers: h,
            body: JSON.stringify({model: 'echo', messages: [{role: 'user', content: 'hi'}]})});
        return [k.status, c.status]; }""")
    assert status == [403, 403]
    shot(page, "12-viewer-forbidden")
    page.context.close()


def test_admin_manages_keys(site):
    page = new_page(site)
    sign_in(site, page, email="admin@acme.example")
    page.goto(site.url + "/console/keys")
    page.fill("#key-form input[name=name]", "ci key")
    page.select_option("#key-form select[name=allowed_models]", ["echo"])
    page.click("#key-form button[type=submit]")
    secret = page.locator("#new-secret").inner_text()
    assert secret.startswith("sk-aigc-")
    assert httpx.get(site.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    shot(page, "13-keys")
    page.reload()
    row = page.locator("#keys-table tr", has_text="ci key")
    row.locator("[data-revoke]").click()
    page.wait_for_function("!document.querySelector('#keys-table').innerText.includes('ci key') || "
                           "document.querySelector('#keys-table').innerText.match(/ci key[^\\n]*revoked/)")
    wait_for(lambda: httpx.get(site.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401,
             "the revoked key to be refused", timeout=30)
    page.context.close()


def test_reviewer_takes_down_a_complained_of_image(site):
    key = site.ids["acme-admin-key"]
    r = httpx.post(site.url + "/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "shapes", "prompt": "square", "seed": 3}, timeout=120)
    assert r.status_code == 200, r.text
    url, gen = r.json()["data"][0]["url"], r.headers["x-generation-ids"].split(",")[0]
    assert httpx.get(url).status_code == 200
    c = httpx.post(site.url + "/v1/complaints", json={"reason": "this image uses our trademark", "generation_id": gen,
                                                      "contact": "legal@example.com"})
    assert c.status_code == 201, c.text
    page = new_page(site)
    sign_in(site, page, email="reviewer@acme.example")
    assert page.url.endswith("/console/review")
    card = page.locator(".complaint", has_text="trademark")
    assert gen in card.inner_text()
    shot(page, "14-review")
    card.locator("input").fill("confirmed trademark use")
    card.locator("[data-action=takedown]").click()
    page.wait_for_load_state()
    page.wait_for_function("!document.body.innerText.includes('this image uses our trademark')")
    assert httpx.get(url).status_code == 404
    page.goto(site.url + "/console/review?status=taken_down")
    assert "confirmed trademark use" in page.locator(".complaint").first.inner_text()
    # an output moderation flagged (the built-in policy flags violent language) is listed, and goes into the queue
    r = httpx.post(site.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "rand", "prompt": "how to stab a melon", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    flagged_id = site.flagged_id = r.headers["x-request-id"] + "-0"
    page.goto(site.url + "/console/review?status=flagged")
    row = page.locator("#flagged-table tr", has_text=flagged_id)
    assert "input: flag (violence)" in row.inner_text()
    shot(page, "14b-review-flagged")
    row.locator("[data-review-generation]").click()
    page.wait_for_url(re.compile(r"status=open"))
    card = page.locator(".complaint", has_text="flagged by moderation")
    assert flagged_id in card.inner_text()
    card.locator("[data-action=dismiss]").click()
    page.wait_for_function("!document.body.innerText.includes('flagged by moderation')")
    page.goto(site.url + "/console/review?status=flagged")
    assert "in the queue" in page.locator("#flagged-table tr", has_text=flagged_id).inner_text()
    page.context.close()


def test_a_tenant_sees_nothing_of_another(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["globex-admin-key"])
    job = getattr(site, "ft_job", None)
    model = getattr(site, "ft_model", None)
    with site.sessions() as s:
        acme_gen = s.query(crud.Generation).filter(crud.Generation.org_id == site.ids["acme"]).first()
        acme_file = s.query(crud.File).filter(crud.File.org_id == site.ids["acme"]).first()
    assert acme_gen is not None
    paths = [f"/console/generations/{acme_gen.id}", f"/console/api/requests/{acme_gen.request_id}"]
    if job:
        paths += [f"/console/training/{job}", f"/console/training/{job}/stream", f"/console/models/{model}"]
    for path in paths:
        assert page.goto(site.url + path).status == 404, path
    page.goto(site.url + "/console/training")
    body = page.locator("main").inner_text()
    assert (acme_file is None or acme_file.id not in body) and (not job or job not in body)
    page.goto(site.url + "/console/models")
    assert not model or model not in page.locator("#models-table").inner_text()
    page.goto(site.url + "/console/usage")
    assert page.locator("#total-requests").inner_text() == "0"
    page.goto(site.url + "/console/review")
    assert "trademark" not in page.locator("main").inner_text()
    page.goto(site.url + "/console/review?status=flagged")
    assert getattr(site, "flagged_id", "req_") not in page.locator("main").inner_text()
    page.context.close()


def test_csrf_token_missing_is_refused(site):
    page = new_page(site)
    sign_in(site, page, key=site.ids["acme-admin-key"])
    out = page.evaluate("""async () => {
        const r = await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({model: 'echo', messages: [{role: 'user', content: 'hi'}]})});
        return [r.status, (await r.json()).error.code]; }""")
    assert out == [403, "csrf_failed"]
    out = page.evaluate("""async () => (await fetch('/console/logout', {method: 'POST', headers: {'Content-Type':
        'application/x-www-form-urlencoded'}, body: 'csrf=wrong'})).status""")
    assert out == 403
    assert page.goto(site.url + "/console/models").status == 200  # still signed in
    page.context.close()


def test_operator_audit_and_chinese(site):
    page = new_page(site, lang="zh-CN")  # the browser's language picks Chinese
    sign_in(site, page, key="operator-secret-token")
    page.goto(site.url + "/console/audit")
    assert page.locator("html").get_attribute("lang") == "zh-CN" and "审计" in page.locator(".side nav").inner_text()
    page.click("#verify")
    assert "完整" in page.locator("#chain-status").inner_text()
    page.fill("input[name=action]", "admin.key")
    page.click(".toolbar button[type=submit]")
    assert all(k.startswith("admin.key") for k in page.locator("#audit-table tbody td:nth-child(3)").all_inner_texts())
    shot(page, "15-audit-zh")
    page.click("text=English")
    assert "Audit" in page.locator(".side nav").inner_text()
    page.click("text=中文")
    assert "用量与账单" in page.locator(".side nav").inner_text()
    page.click("text=退出")
    assert "/console/login" in page.url
    assert page.goto(site.url + "/console/audit").url.endswith("/console/login?next=/console/audit&expired=1") or \
        "/console/login" in page.url
    page.context.close()
