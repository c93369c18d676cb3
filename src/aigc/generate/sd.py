"""Pretrained text-to-image pipelines of the Stable Diffusion family, loaded from a local path (never a hub download):
text-to-image, image-to-image and inpainting, with the schedulers users know by name.

A pipeline is a diffusers-format folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; SD 1.x/2.x, or SDXL with a second text encoder) or a single ``.safetensors`` /
``.ckpt`` checkpoint, which diffusers converts with the architecture's config: offline that config must be given as
a diffusers-format folder (``config=``), and an error says so. Everything loads with ``local_files_only``; a missing
part is named in a clear error.

``SDPipeline.generate`` takes a prompt, a negative prompt, a scheduler name, steps, guidance, size and a seed (image
i of a batch comes from seed + i, and the same seed gives the same image); ``init_image`` turns it into image-to-image (``strength``), and ``mask`` (white:
repaint) into inpainting. The three share one set of weights in memory (diffusers' ``from_pipe``).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from aigc.errors import UserError

# The names people use (A1111 / ComfyUI) -> (diffusers scheduler class, its options).
SCHEDULERS = {
    "dpm++ 2m karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def scheduler_named(name: str, config: dict):
    """A diffusers scheduler from one of SCHEDULERS' names, configured from the pipeline's own scheduler config."""
    import diffusers

    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: one of {', '.join(SCHEDULERS)}")
    cls, options = SCHEDULERS[key]
    return getattr(diffusers, cls).from_config(config, **options)


def inspect(path: Path) -> dict:
    """What a local pipeline path holds: {"format": "diffusers" | "single_file", "family": "sd" | "sdxl", ...}; a clear
    error naming what is missing otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"pipeline not found: {path}")
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"{path}: a single-file checkpoint is a .safetensors or .ckpt file")
        return {"format": "single_file", "family": "sdxl" if "xl" in path.name.lower() else "sd"}
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    spec = json.loads(index.read_text(encoding="utf-8"))
    missing = [p for p in PIPELINE_PARTS if p in spec and not (path / p).is_dir()]
    if missing:
        raise UserError(f"{path}: the pipeline's {', '.join(missing)} folder{'s are' if len(missing) > 1 else ' is'} missing")
    family = "sdxl" if "text_encoder_2" in spec or "XL" in spec.get("_class_name", "") else "sd"
    return {"format": "diffusers", "family": family, "class": spec.get("_class_name", "")}


@dataclass
class SDParams:
    prompt: str = ""
    negative_prompt: str = ""
    n: int = 1
    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    scheduler: str = "dpm++ 2m karras"
    strength: float = 0.75  # image-to-image and inpainting: how much of the init image is repainted

    def validate(self) -> None:
        if not 1 <= self.n <= 16:
            raise UserError(f"n must be between 1 and 16, got {self.n}")
        if not 1 <= self.steps <= 200:
            raise UserError(f"steps must be between 1 and 200, got {self.steps}")
        if not 0 <= self.guidance <= 50:
            raise UserError(f"guidance must be between 0 and 50, got {self.guidance}")
        if self.width % 8 or self.height % 8 or not (8 <= self.width <= 2048 and 8 <= self.height <= 2048):
            raise UserError(f"width and height must be multiples of 8 between 8 and 2048, got {self.width}x{self.height}")
        if not 0 < self.strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {self.strength}")
        if self.scheduler.strip().lower() not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}: one of {', '.join(SCHEDULERS)}")


class SDPipeline:
    """One loaded pipeline (its weights once in memory) and its three tasks."""

    def __init__(self, pipe, info: dict, device: str = "cpu"):
        self.pipe, self.info, self.device = pipe, info, device
        self._base_scheduler = dict(pipe.scheduler.config)
        self._tasks: dict[str, object] = {"text2image": pipe}
        self.lock = threading.Lock()  # one generation at a time: the runs sharing this pipeline switch its adapters
        self.adapters: set[str] = set()  # LoRA adapters loaded on it, by name

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "auto", config: str | Path | None = None) -> SDPipeline:
        """From a diffusers folder or a single checkpoint file (``config``: the diffusers folder of its architecture)."""
        import torch
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        info = inspect(Path(path))
        torch_dtype = {"auto": torch.float16 if str(device).startswith("cuda") else torch.float32,
                       "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        if torch_dtype is None:
            raise UserError(f"dtype must be auto, fp32, fp16 or bf16, got {dtype!r}")
        cls_ = StableDiffusionXLPipeline if info["family"] == "sdxl" else StableDiffusionPipeline
        try:
            if info["format"] == "diffusers":
                kw = {"safety_checker": None, "requires_safety_checker": False} if cls_ is StableDiffusionPipeline else {}
                pipe = cls_.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype, **kw)
            else:
                if config is None:
                    raise UserError(f"{path}: a single-file checkpoint needs its architecture's config offline: pass a "
                                    "diffusers-format folder of the same family (SD 1.x, 2.x or XL) as its config")
                pipe = cls_.from_single_file(str(path), config=str(config), local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load the pipeline at {path}: {str(exc).splitlines()[0][:300]}") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), info, str(device))

    def _task(self, name: str):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if name not in self._tasks:
            maker = {"image2image": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}[name]
            self._tasks[name] = maker.from_pipe(self.pipe)  # the same modules: no second copy of the weights
            self._tasks[name].set_progress_bar_config(disable=True)
        return self._tasks[name]

    def generate(self, params: SDParams, init_image=None, mask=None) -> list:
        """PIL images: text-to-image, image-to-image (``init_image``) or inpainting (``init_image`` + ``mask``)."""
        import torch

        params.validate()
        if mask is not None and init_image is None:
            raise UserError("a mask needs the image it masks (init_image)")
        task = "inpaint" if mask is not None else "image2image" if init_image is not None else "text2image"
        pipe = self._task(task)
        pipe.scheduler = scheduler_named(params.scheduler, self._base_scheduler)
        # image i from seed + i (as the web UIs): each image of a batch is re-made alone by its own seed
        generators = [torch.Generator(device="cpu").manual_seed(params.seed + i) for i in range(params.n)]
        kw = dict(prompt=params.prompt, negative_prompt=params.negative_prompt or None, num_images_per_prompt=params.n,
                  num_inference_steps=params.steps, guidance_scale=params.guidance, generator=generators, output_type="pil")
        if task == "text2image":
            kw.update(width=params.width, height=params.height)
        else:
            kw.update(image=init_image.convert("RGB").resize((params.width, params.height)), strength=params.strength)
            if task == "inpaint":
                kw.update(mask_image=mask.convert("L").resize((params.width, params.height)), width=params.width,
                          height=params.height)
        with torch.inference_mode():
            return list(pipe(**kw).images)


class SDRun:
    """A Stable Diffusion run (``run.SDMeta``): its pipeline and its defaults. Runs on the same base pipeline share
    one copy of it (``bases``: the server's registry of loaded bases): a LoRA run is an adapter loaded on the shared
    base under its own name, switched on for its own generations and off for the others'."""

    def __init__(self, run: Path, meta, pipe: SDPipeline, adapter: str | None = None):
        self.run, self.meta, self.sd, self.adapter = Path(run), meta, pipe, adapter

    @classmethod
    def from_run(cls, run: str | Path, device: str = "cpu", bases=None) -> SDRun:
        from aigc.run import SDMeta, model_folder

        meta = SDMeta.load(run)
        key = (str(Path(meta.init_path).resolve()), meta.config or "", str(device))
        sd = bases.get(key) if bases is not None else None
        if sd is None:
            sd = SDPipeline.load(meta.init_path, device=device, config=meta.config)
            if bases is not None:
                bases[key] = sd
        adapter = None
        if meta.lora:  # the adapter trained on it, on top of the base
            folder = model_folder(run)
            if not (folder / meta.lora).is_file():
                raise UserError(f"{run}: its LoRA adapter {folder / meta.lora} is missing")
            adapter = "run-" + hashlib.sha256(str(Path(run).resolve()).encode()).hexdigest()[:12]
            with sd.lock:
                if adapter not in sd.adapters:
                    sd.pipe.load_lora_weights(str(folder), weight_name=meta.lora, adapter_name=adapter)
                    sd.adapters.add(adapter)
        return cls(Path(run), meta, sd, adapter)

    def params(self, **given) -> SDParams:
        """SDParams from the run's defaults, with what is given (None: the default) on top."""
        m = self.meta
        base = {"negative_prompt": m.negative_prompt, "steps": m.steps, "guidance": m.guidance, "width": m.width,
                "height": m.height, "scheduler": m.scheduler}
        p = SDParams(**{**base, **{k: v for k, v in given.items() if v is not None}})
        p.validate()
        return p

    def generate(self, params: SDParams, init_image=None, mask=None) -> list:
        with self.sd.lock:
            if self.adapter is not None:
                self.sd.pipe.enable_lora()
                self.sd.pipe.set_adapters([self.adapter], adapter_weights=[1.0])
            elif self.sd.adapters:
                self.sd.pipe.disable_lora()  # the base alone, though another run's adapters are loaded on it
            return self.sd.generate(params, init_image=init_image, mask=mask)
