"""Governance from the command line: watermarked text and images, verify, audit, policy, keys, retention."""
import json

from conftest import run_cli as run


def test_text_watermark_and_verify(tmp_path, spread_model):
    run_dir = spread_model
    def sample(seed, *extra):
        return json.loads(run("generate", "text", run_dir, "--prompt", "The ", "--max-new-tokens", "200", "--seed", seed,
                              "--temperature", "1", "--json", *extra).stdout)["completions"][0]["text"]
    # a random model may draw its end-of-text token early: take the first seed that gives a long sample
    seed = next(s for s in range(1, 20) if len(sample(s)) > 150)
    marked, plain = sample(seed), sample(seed, "--no-watermark")
    assert marked != plain
    # random text may start with "-": "--" ends the options, as for any command line
    rep = json.loads(run("verify", "--model", run_dir, "--json", "--", marked).stdout)["text_watermark"]
    assert rep["detected"] and rep["z"] > 4
    unmarked = run("verify", "--model", run_dir, "--json", "--", plain, ok=False)
    assert unmarked.returncode == 1 and not json.loads(unmarked.stdout)["text_watermark"]["detected"]  # the exit status is the verdict
    (tmp_path / "m.txt").write_text(marked)
    assert "DETECTED" in run("verify", tmp_path / "m.txt", "--text-file", "--model", run_dir).stdout
    assert "DETECTED" in run("verify", "-", "--model", run_dir, stdin=marked).stdout
    short = run("verify", "--model", run_dir, "--", marked[:12], ok=False)
    assert short.returncode == 1 and "not detected" in short.stdout and "short texts" in short.stdout  # truncated text: a clear answer
    for args, message in ((["some text"], "needs the model"), (["some text", "--model", tmp_path], "no tokenizer found")):
        res = run("verify", *args, ok=False)
        assert res.returncode == 2 and message in res.stderr

    # Many texts in one process, one result line each; the exit status says whether all were detected.
    rows = [{"id": "a", "text": marked}, plain, {"id": "c", "text": marked[:150]}]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    many = run("verify", "--jsonl", tmp_path / "texts.jsonl", "--model", run_dir, "--json", ok=False)
    lines = [json.loads(line) for line in many.stdout.splitlines()]
    assert many.returncode == 1 and [r["target"] for r in lines] == ["a", "texts.jsonl:2", "c"]
    assert [r["verdict"] for r in lines] == [True, False, True] and lines[0]["text_watermark"]["z"] == rep["z"]
    (tmp_path / "good.jsonl").write_text(json.dumps(marked) + "\n")
    assert run("verify", "--jsonl", tmp_path / "good.jsonl", tmp_path / "m.txt", "--text-file", "--model", run_dir).stdout.count("DETECTED") == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(marked) + "\n{oops\n")
    bad = run("verify", "--jsonl", tmp_path / "bad.jsonl", "--model", run_dir, ok=False)
    assert bad.returncode == 2 and "bad.jsonl:2: not JSON" in bad.stderr and not bad.stdout  # checked before any result

    # Another home has no key for these texts: a clear error naming it, and no key is created there.
    other = tmp_path / "other-home"
    res = run("verify", "--home", other, "--model", run_dir, "--", marked, ok=False)
    assert res.returncode == 2 and "no text-watermark key in" in res.stderr and str(other) in res.stderr
    assert not (other / "keys").exists()


def test_images_signed_and_verified_and_admin_governance(tmp_path, image_model):
    db = f"sqlite:///{tmp_path / 'g.db'}"
    res = json.loads(run("generate", "image", image_model, "--caption", "a large red circle in the center", "--n", "2",
                         "--size", "256", "--out", tmp_path / "gen", "--json").stdout)
    first = res["images"][0]
    assert first["c2pa"] and first["watermark_id"] is not None
    rep = json.loads(run("verify", first["file"], "--db", db, "--json").stdout)
    assert rep["c2pa"]["state"] == "Trusted" and rep["c2pa"]["manifest"]["model"] == image_model.name
    assert rep["image_watermark"]["watermark_id"] == first["watermark_id"]
    text = run("verify", first["file"], "--db", db).stdout
    assert "C2PA: Trusted" in text and "image watermark: id" in text
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = run("verify", tmp_path / "broken.png", "--db", db, "--json", ok=False)
    broken = json.loads(res.stdout)
    assert res.returncode == 1 and broken["c2pa"]["state"] == "Invalid" and not broken["image_watermark"]["found"]
    both = run("verify", first["file"], tmp_path / "broken.png", "--db", db, ok=False)
    assert both.returncode == 1 and both.stdout.splitlines() == [f"{first['file']}: C2PA Trusted; image watermark id {first['watermark_id']}",
                                                                 f"{tmp_path / 'broken.png'}: C2PA Invalid; no image watermark"]
    (tmp_path / "empty.png").write_bytes(b"")
    assert "is empty" in run("verify", tmp_path / "empty.png", "--db", db, ok=False).stderr
    jpg = json.loads(run("generate", "image", image_model, "--caption", "a large red circle in the center", "--n", "1",
                         "--format", "jpeg", "--out", tmp_path / "gen", "--json").stdout)["images"][0]
    assert jpg["file"].endswith("000000.jpg") and jpg["c2pa"]
    rep = json.loads(run("verify", jpg["file"], "--db", db, "--json").stdout)
    assert rep["kind"] == "image/jpeg" and rep["c2pa"]["state"] == "Trusted" and rep["image_watermark"]["watermark_id"] == jpg["watermark_id"]
    assert "--format must be png or jpeg" in run("generate", "image", image_model, "--format", "gif", ok=False).stderr

    run("admin", "plan", "create", "payg", "--kind", "payg", "--db", db)
    run("admin", "org", "create", "acme", "--plan", "payg", "--db", db)
    pol = json.loads(run("admin", "org", "policy", "acme", "--set", "retention_days=7", "--set", "png_parameters=false",
                         "--db", db, "--json").stdout)
    assert pol["retention_days"] == 7 and pol["png_parameters"] is False and pol["c2pa"] is True
    assert "unknown policy setting" in run("admin", "org", "policy", "acme", "--set", "colour=red", "--db", db, ok=False).stderr
    assert "true or false" in run("admin", "org", "policy", "acme", "--set", "c2pa=maybe", "--db", db, ok=False).stderr
    (tmp_path / "bad.yaml").write_text("rules: [{id: x, action: explode, terms: [a]}]")
    assert "block, redact or flag" in run("admin", "org", "policy", "acme", "--moderation", tmp_path / "bad.yaml", "--db", db,
                                          ok=False).stderr
    assert "purged_generations" in run("admin", "purge", "--db", db, "--json").stdout
    assert "k2" in run("admin", "keys", "rotate").stdout
    assert "now sealed with k2" in run("admin", "keys", "reencrypt", "--db", db).stdout
    ok = run("audit", "verify", "--db", db).stdout
    assert "intact" in ok
    head = run("audit", "head", "--db", db).stdout.strip()
    assert len(head) == 64 and "intact" in run("audit", "verify", "--db", db, "--expect-head", head).stdout
    kinds = [e["kind"] for e in json.loads(run("audit", "show", "--db", db, "--json").stdout)]
    # (the purge found nothing to clear, so it wrote no entry)
    assert {"admin.plan.create", "admin.org.create", "admin.policy.set", "keys.reencrypt"} <= set(kinds)


def test_moderation_report_explains_its_rows(tmp_path):
    rows = [{"text": "I will kill you tomorrow", "label": 1}, {"text": "how do I poison the neighbour's dog", "label": 1},
            {"text": "a sunny product description", "label": 0}, {"text": "tell me how to hurt someone badly", "label": 1}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = run("eval", "moderation", "--data", tmp_path / "set.jsonl").stdout.splitlines()
    assert text[0].startswith("moderation on 4 labelled examples") and "(3 harmful, 1 harmless)" in text[0]
    assert "precision: of the texts a row stops, the share that are harmful" in text[1]
    assert text[2].split() == ["rules,", "blocks", "only:", "stopped", "1:", "precision", "1.000", "recall", "0.333", "f1", "0.500"]
    assert "rules, blocks or flags: stopped 2: precision 1.000  recall 0.667" in text[3]
    (tmp_path / "calm.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[3]) + "\n")
    calm = run("eval", "moderation", "--data", tmp_path / "calm.jsonl").stdout
    assert "stopped nothing: none of these texts contains a phrase of a rule that blocks; recall 0.000 (1 harmful texts through)" in calm
    report = json.loads(run("eval", "moderation", "--data", tmp_path / "set.jsonl", "--json").stdout)
    assert report["rules_block"]["tp"] == 1 and report["rules_block_or_flag"]["tp"] == 2
