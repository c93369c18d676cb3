"""Long evaluations report each stage's progress: every stage starts, only moves forward and reaches its total."""
from collections import defaultdict


def stages_of(call) -> dict:
    seen = defaultdict(list)
    call(lambda stage, done, total: seen[stage].append((done, total)))
    for stage, points in seen.items():
        done = [d for d, _ in points]
        assert done == sorted(done) and done[-1] == points[-1][1] and len({t for _, t in points}) == 1, (stage, points)
    return dict(seen)


def test_text_eval_stages(tiny_run):
    from aigc.eval.text import evaluate_run

    stages = stages_of(lambda p: evaluate_run(tiny_run, n_pairs=3, n_samples=2, max_new_tokens=10, progress=p))
    assert list(stages) == ["held-out likelihood (windows)", "continuing held-out prompts", "samples for diversity"]
    assert stages["samples for diversity"][-1] == (2, 2)


def test_image_eval_stages(image_model, tmp_path, monkeypatch):
    from aigc.eval.image import evaluate_run

    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    stages = stages_of(lambda p: evaluate_run(image_model, n=8, feature_steps=20, progress=p))
    assert list(stages) == ["training the feature network (once per dataset)", "generating images",
                            "scoring: FID, KID, precision/recall, accuracy"]
    assert stages["generating images"][-1] == (8, 8)
    cached = stages_of(lambda p: evaluate_run(image_model, n=8, feature_steps=20, progress=p))
    assert "training the feature network (once per dataset)" not in cached  # from the cache


def test_music_eval_stages(music_model):
    from aigc.eval.music import evaluate_run

    stages = stages_of(lambda p: evaluate_run(music_model, n_samples=2, bars=1, progress=p))
    assert list(stages) == ["held-out likelihood (pieces)", "composing samples"] and stages["composing samples"][-1] == (2, 2)
