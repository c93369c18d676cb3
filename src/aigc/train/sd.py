"""A run directory for a pretrained Stable Diffusion-family pipeline on this machine (``aigc train image --init.path``):
the pipeline is checked and loaded once (so a run that exists also loads), then referenced by path, never copied, and
its defaults written down (``run.SDMeta``). ``generate``, ``serve`` and ``verify`` then use it like any image run."""
from __future__ import annotations

from pathlib import Path

import yaml

from aigc.data import store
from aigc.errors import UserError
from aigc.generate.sd import SDParams, SDPipeline, inspect
from aigc.run import SDMeta

DEFAULT_SIZE = {"sd": 512, "sdxl": 1024}


def import_pipeline(init_path: str | Path, run: str | Path, config: str | Path | None = None, overwrite: bool = False,
                    defaults: dict | None = None, loaded: SDPipeline | None = None) -> dict:
    """Write ``run`` for the pipeline at ``init_path``; ``defaults``: width, height, steps, guidance, scheduler,
    negative_prompt; ``loaded``: the pipeline already loaded by the caller (not loaded a second time). Returns a summary."""
    init_path, run = Path(init_path).resolve(), Path(run)
    info = inspect(init_path)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise UserError(f"--init.config {config}: not a diffusers pipeline folder (no model_index.json)")
    unknown = sorted(set(defaults or {}) - {"width", "height", "steps", "guidance", "scheduler", "negative_prompt"})
    if unknown:
        raise UserError(f"unknown --sd.{unknown[0]}: the defaults are width, height, steps, guidance, scheduler, negative_prompt")
    side = DEFAULT_SIZE[info["family"]]
    meta = SDMeta(str(init_path), info["family"], info["format"], str(Path(config).resolve()) if config else None,
                  width=side, height=side)
    for k, v in (defaults or {}).items():
        setattr(meta, k, type(getattr(meta, k))(v))
    SDParams(width=meta.width, height=meta.height, steps=meta.steps, guidance=meta.guidance, scheduler=meta.scheduler).validate()
    pipe = loaded or SDPipeline.load(init_path, config=config)  # fails here, before the run is written, if it cannot load
    with store.atomic_folder(run, overwrite) as tmp:  # the whole run or nothing (an old one is replaced only at the end)
        (tmp / "model").mkdir()
        meta.save(tmp / "model")
        _write_config(tmp, meta)
    return {"run": str(run), "kind": "sd", "family": info["family"], "format": info["format"], "init_path": str(init_path),
            "pipeline": type(pipe.pipe).__name__, "width": meta.width, "height": meta.height}


def _write_config(run: Path, meta: SDMeta) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump({"init": {"path": meta.init_path, "config": meta.config},
                                                     "sd": {k: getattr(meta, k) for k in ("width", "height", "steps", "guidance",
                                                                                           "scheduler", "negative_prompt")}},
                                                    sort_keys=False, allow_unicode=True), encoding="utf-8")
