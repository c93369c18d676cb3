"""Music and video from the command line: prepare -> train -> resume -> generate -> eval -> video -> verify."""
import json

from PIL import Image

from conftest import run_cli as run


def test_music_and_video_workflow(tmp_path, image_model, text_model):
    data, music = tmp_path / "chorales", tmp_path / "music"
    manifest = json.loads(run("data", "prepare", "--builtin", "chorales", "--count", "4", "--transpose=-1:1",
                              "--val-fraction", "0.3", "--out", data, "--json").stdout)
    assert manifest["kind"] == "music" and manifest["pieces"]["read"] == 4 and manifest["augment"]["transpose"] == [-1, 1]
    bad = run("data", "prepare", "--kind", "music", "--builtin", "chorales", "--transpose", "x", "--out", tmp_path / "b", ok=False)
    assert bad.returncode == 2 and "--transpose" in bad.stderr and not (tmp_path / "b").exists()

    run("train", "music", "tiny", "--data", data, "--run", music, "--train.max_steps=6", "--train.samples=1")
    res = json.loads(run("train", "music", "--run", music, "--resume", "--train.max_steps=10", "--json").stdout)
    assert res["steps"] == 10
    assert [json.loads(x)["step"] for x in (music / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))
    assert (music / "samples" / "sample-0.mid").is_file()

    out = tmp_path / "gen"
    pieces = json.loads(run("generate", "music", music, "--bars", "2", "--key", "E minor", "--tempo", "90", "--n", "2",
                            "--seed", "5", "--synth", "builtin", "--out", out, "--json").stdout)["pieces"]
    assert [p["seed"] for p in pieces] == [5, 6] and all(p["key"] == "E minor" and p["tempo"] == 90 for p in pieces)
    again = json.loads(run("generate", "music", music, "--bars", "1", "--seed", "5", "--synth", "builtin", "--out", out,
                           "--json").stdout)["pieces"][0]
    assert (again["midi"], again["wav"]) == (str(out / "music-000005-2.mid"), str(out / "music-000005-2.wav"))  # nothing replaced
    verdict = json.loads(run("verify", pieces[0]["wav"], "--json").stdout)
    assert verdict["kind"] == "audio/wav" and verdict["c2pa"]["state"] == "Trusted"
    cont = json.loads(run("generate", "music", music, "--primer", pieces[0]["midi"], "--bars", "1", "--out", out / "more",
                          "--no-wav", "--json").stdout)["pieces"][0]
    assert cont["primer_bars"] == 2 and "wav" not in cont
    bad = run("generate", "music", music, "--key", "X major", ok=False)
    assert bad.returncode == 2 and "tonic" in bad.stderr

    report = json.loads(run("eval", "music", music, "--samples", "2", "--bars", "2", "--json").stdout)
    assert report["likelihood"]["nats_per_note"] > 0 and (music / "eval" / "report.md").is_file()

    video = tmp_path / "video"
    res = json.loads(run("generate", "video", image_model, "--prompt", "shapes", "--text-run", text_model, "--scenes", "2",
                         "--music-run", music, "--seconds", "1", "--fps", "6", "--captions", "--out", video, "--json").stdout)
    assert res["frames"] == 6 and res["audio"] and len(res["scenes"]) == 2
    story = json.loads((video / "storyboard.json").read_text())
    assert story["source"] == "text model" and all(s["condition"] for s in story["scenes"])
    assert Image.open(video / "keyframes" / "scene-01.png").size == (256, 256)
    verdict = json.loads(run("verify", video / "video.mp4", "--json").stdout)
    assert verdict["kind"] == "video/mp4" and verdict["c2pa"]["state"] == "Trusted"
    again = run("generate", "video", image_model, "--prompt", "shapes", "--out", video, ok=False)
    assert again.returncode == 2 and "already exists" in again.stderr
