"""Video composition: storyboard, frame plan, latent interpolation, soundtrack and H.264 + AAC muxing."""
import json

import numpy as np
import pytest
from PIL import Image

from aigc.govern.delivery import first_frame
from aigc.errors import UserError
from aigc.generate.video import (VideoParams, burn_caption, choose_condition, compose, fit_audio, frame_plan,
                                 mux_mp4, probe_mp4, split_prompt)


def test_frame_plan_holds_then_morphs():
    plan = frame_plan(12, 3, 0.5)
    assert len(plan) == 12
    assert [s for s, _, _ in plan] == [0] * 4 + [1] * 4 + [2] * 4
    morphs = [m for s, _, m in plan if s == 0]
    assert morphs[:2] == [0.0, 0.0] and 0 < morphs[2] < morphs[3] < 1
    assert all(m == 0 for s, _, m in plan if s == 2)  # the last scene only holds


def test_storyboard_from_the_prompt_and_caption_matching(image_model):
    from aigc.generate.image import ImagePipeline

    assert split_prompt("a red circle; then a blue square") == ["a red circle", "a blue square"]
    assert split_prompt("红色圆形；蓝色方形") == ["红色圆形", "蓝色方形"]
    meta = ImagePipeline.from_run(image_model).meta
    cond, reason = choose_condition(meta, "a blue triangle", "", 0)
    assert "blue" in cond and "triangle" in cond and "nearest training caption" in reason
    cond, reason = choose_condition(meta, "zzz", "", 0)
    assert cond in meta.prompts and "chosen by the seed" in reason


def test_mux_gives_h264_and_aac_of_the_right_length():
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    frames[:, :, :32] = 200
    audio = fit_audio(np.random.default_rng(0).uniform(-0.5, 0.5, (44100 * 2, 2)).astype(np.float32), 1.0, 44100)
    assert audio.shape == (44100, 2) and audio[-1].max() == 0  # cut to a second and faded out
    info = probe_mp4(mux_mp4(frames, 12, audio))
    assert info["video"]["codec"] == "h264" and info["video"]["frames"] == 12
    assert (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert info["audio"]["codec"] == "aac" and info["audio"]["sample_rate"] == 44100 and info["audio"]["channels"] == 2
    assert info["duration_s"] == pytest.approx(1.0, abs=0.1)
    silent = probe_mp4(mux_mp4(frames, 12, None))
    assert "audio" not in silent


def test_caption_is_burned_in():
    img = np.full((128, 128, 3), 30, np.uint8)
    out = burn_caption(img, "a red circle")
    assert (out[-20:] != img[-20:]).any() and (out[:40] == img[:40]).all()


def test_compose_one_second_video(tmp_path, image_model, music_model):
    from aigc.govern import image_watermark

    params = VideoParams(prompt="a red circle; a blue square", seconds=1.0, fps=12, size=256, captions=True, seed=5)
    r = compose(image_model, tmp_path / "v", params, music_run=music_model)
    assert r.frames == 12 and r.audio and len(r.storyboard) == 2
    for name in ("storyboard.json", "params.json", "soundtrack.mid", "soundtrack.wav", "keyframes/scene-01.png", "keyframes/scene-02.png"):
        assert (tmp_path / "v" / name).is_file(), name
    story = json.loads((tmp_path / "v" / "storyboard.json").read_text())
    assert [s["text"] for s in story["scenes"]] == ["a red circle", "a blue square"]
    assert "red" in story["scenes"][0]["condition"] and "blue" in story["scenes"][1]["condition"]
    info = probe_mp4(r.mp4)
    assert info["video"]["frames"] == 12 and info["video"]["width"] == 256 and info["audio"]["codec"] == "aac"
    # The frames carry the watermark; H.264 4:4:4 keeps it readable (4:2:0 is for compatibility).
    keyframe = image_watermark.extract(Image.open(tmp_path / "v" / "keyframes" / "scene-01.png"))
    assert keyframe.found and keyframe.watermark_id == r.watermark_id
    full = compose(image_model, tmp_path / "c", VideoParams(prompt="a red circle", scenes=1, seconds=0.5, fps=4, chroma="444", seed=5))
    found = image_watermark.extract(first_frame(full.mp4))
    assert found.found and found.watermark_id == full.watermark_id
    again = compose(image_model, tmp_path / "w", params, music_run=music_model)
    assert probe_mp4(again.mp4)["video"] == info["video"]
    a = np.asarray(first_frame(again.mp4), dtype=float)
    b = np.asarray(first_frame(r.mp4), dtype=float)
    assert np.abs(a - b).mean() < 3  # the same seed re-makes the same frames (up to the random watermark id)


def test_compose_refuses_bad_input(tmp_path, image_model):
    with pytest.raises(UserError, match="fps"):
        compose(image_model, tmp_path / "x", VideoParams(prompt="a", fps=0))
    with pytest.raises(UserError, match="frames cannot show"):
        compose(image_model, tmp_path / "x", VideoParams(prompt="a", scenes=5, seconds=0.5, fps=2))
    with pytest.raises(UserError, match="no storyboard"):
        compose(image_model, tmp_path / "x", VideoParams(prompt=""))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        compose(image_model, tmp_path / "busy", VideoParams(prompt="a"))
    assert (tmp_path / "busy" / "f").read_text() == "keep"


def test_a_voice_over_speaks_each_scene_line_and_the_track_carries_the_frames_mark(tmp_path, image_model, music_model):
    from tests.test_speech import need_espeak

    from aigc.data import audio as aio
    from aigc.govern import audio_watermark, records

    need_espeak()
    key = b"v" * 32
    params = VideoParams(scene_texts=["a red circle", "a blue square"], seconds=6.0, fps=4, size=256, seed=2,
                         voice="espeak-en")
    r = compose(image_model, tmp_path / "v", params, music_run=music_model, audio_key=key)
    assert r.audio and r.audio_marked and r.timings["voice"] == "espeak-en"
    voice, rate = aio.read_wav((tmp_path / "v" / "voiceover.wav").read_bytes())
    assert rate == 44100 and len(voice) == pytest.approx(6.0 * rate, abs=2)
    level = np.abs(voice[:, 0])
    second = int(r.storyboard[1].start_s * rate)
    assert level[: int(0.5 * rate)].max() > 0.05 and level[second: second + int(0.5 * rate)].max() > 0.05  # each line at its scene
    track, track_rate = aio.decode(r.mp4)  # the AAC soundtrack as muxed
    got = audio_watermark.extract(track, track_rate, key)
    assert got.found and got.watermark_id == r.watermark_id
    assert records.verify_file(r.mp4, "", audio_key=key)["audio_watermark"]["watermark_id"] == r.watermark_id
    with pytest.raises(UserError, match="voice_speed"):
        compose(image_model, tmp_path / "x", VideoParams(prompt="a", voice="auto", voice_speed=9))
