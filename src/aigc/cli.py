"""The ``aigc`` command line: one verb per stage (data, train, generate, eval, export, serve, admin, usage).

User mistakes print one line (``error: ...``) and exit with status 2; ``--json`` gives
machine-readable output for scripting.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from aigc import threads  # the CPU thread policy: every command that computes calls threads.configure()
from aigc.errors import UserError
from aigc.run import fingerprint, model_folder

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AIGC: train, evaluate and run vertical generative models on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare corpora.")
train_app = typer.Typer(no_args_is_help=True, help="Train models.")
generate_app = typer.Typer(no_args_is_help=True, help="Generate content with a trained run.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a trained run.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(generate_app, name="generate")
app.add_typer(eval_app, name="eval")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _stage_progress(transient: bool = True):
    """A bar per stage of a long job (evaluation): ``progress(stage, done, total)`` creates and moves them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), console=err, transient=transient)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, progress


def _emit_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


# ---------------------------------------------------------------- data

@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Files (.txt, .jsonl, .csv) or folders (images: class sub-folders).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data files + manifest.json).")] = Path("data/prepared"),
    builtin: Annotated[Optional[list[str]], typer.Option("--builtin", help="Built-in data: pydoc, tang (text); products, exercises, poems (chat or preference tasks with checkers); digits, shapes (image); chorales (music).")] = None,
    kind: Annotated[Optional[str], typer.Option(help="text, chat, preference, image or music (default: from --builtin, else text).")] = None,
    data_format: Annotated[str, typer.Option("--format", help="Chat: auto, messages, alpaca, sharegpt or prompt_completion; preference: auto or preference.")] = "auto",
    column: Annotated[Optional[list[str]], typer.Option("--column", help="Chat: OURS=THEIRS, a field of another name (e.g. instruction=question); repeatable.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Chat (sharegpt): TAG=ROLE for other speaker tags (e.g. doctor=assistant); repeatable.")] = None,
    size: Annotated[int, typer.Option(help="Image: side in pixels after resize and centre crop.")] = 32,
    mode: Annotated[str, typer.Option(help="Image: rgb or gray.")] = "rgb",
    hflip: Annotated[bool, typer.Option("--hflip", help="Image: random horizontal flips while training.")] = False,
    count: Annotated[Optional[int], typer.Option(help="Image: how many built-in shapes to draw (default 5000). Music: at most this many built-in chorales (default: all). Chat tasks: records to generate (default 1000).")] = None,
    transpose: Annotated[str, typer.Option(help="Music: transposition range for augmentation, LOW:HIGH semitones (0:0 turns it off).")] = "-5:6",
    field: Annotated[str, typer.Option(help="JSON field or CSV column with the text.")] = "text",
    normalization: Annotated[str, typer.Option(help="Unicode normalisation: NFC, NFKC or none.")] = "NFC",
    txt_split: Annotated[str, typer.Option(help=".txt documents: paragraph, line or file.")] = "paragraph",
    min_chars: Annotated[int, typer.Option(help="Drop documents shorter than this.")] = 1,
    max_chars: Annotated[int, typer.Option(help="Drop documents longer than this (0: no limit).")] = 0,
    near_dup_threshold: Annotated[Optional[float], typer.Option(help="MinHash Jaccard threshold for near-duplicates (0 disables; default 0.8, chat: 0.9 on the prompt).")] = None,
    no_exact_dedup: Annotated[bool, typer.Option("--no-exact-dedup", help="Keep exact duplicates.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 1337,
    pii: Annotated[str, typer.Option(help="Text: personal data (e-mail, phone, ID and card numbers, IPs): mask, hash, drop (the document) or off.")] = "mask",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
):
    """Clean, deduplicate and split a text corpus or conversations, or convert and split images or music; write it with a manifest."""
    from aigc.config import from_dict

    if kind is None:
        kind = "image" if builtin and set(builtin) <= {"digits", "shapes"} else "music" if builtin and set(builtin) == {"chorales"} \
            else "chat" if builtin and set(builtin) <= {"products", "exercises", "poems"} else "text"
    if kind == "music":
        _prepare_music(inputs or [], out_dir, builtin, count or 0, transpose, val_fraction, seed, overwrite, as_json)
        return
    if kind == "image":
        _prepare_images(inputs or [], out_dir, builtin, {"size": size, "mode": mode, "hflip": hflip, "count": 5000 if count is None else count,
                                                         "val_fraction": val_fraction, "seed": seed}, overwrite, as_json)
        return
    if kind in ("chat", "preference"):
        from aigc.data.chat import ChatPrepareOptions, prepare as prepare_chat

        opts = from_dict(ChatPrepareOptions, {"kind": kind, "format": data_format, "columns": _parse_vars(column or [], "--column"),
                                              "tags": {k.lower(): v for k, v in _parse_vars(tag or [], "--tag").items()},
                                              "normalization": normalization, "max_chars": max_chars,
                                              "near_dedup_threshold": 0.9 if near_dup_threshold is None else near_dup_threshold,
                                              "exact_dedup": not no_exact_dedup, "val_fraction": val_fraction, "seed": seed, "pii": pii})
        with err.status(f"preparing {kind} data"):
            manifest = prepare_chat(inputs or [], out_dir, opts, overwrite=overwrite, builtin=builtin,
                                    count=1000 if count is None else count)
        if as_json:
            _emit_json(manifest)
            return
        r = manifest["records"]
        dropped = ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none"
        out.print(f"wrote {out_dir}: {r['train']} train / {r['val']} val {kind} examples of {r['read']} records; dropped: {dropped}",
                  markup=False, highlight=False)
        return
    if kind != "text":
        raise UserError(f"--kind must be text, chat, preference, image or music, got {kind!r}")
    from aigc.data.text import PrepareOptions, prepare

    opts = from_dict(PrepareOptions, {"field": field, "normalization": normalization, "txt_split": txt_split,
                                      "min_chars": min_chars, "max_chars": max_chars,
                                      "near_dedup_threshold": 0.8 if near_dup_threshold is None else near_dup_threshold,
                                      "exact_dedup": not no_exact_dedup, "val_fraction": val_fraction, "seed": seed, "pii": pii})
    with err.status("preparing corpus"):
        manifest = prepare(inputs or [], out_dir, opts, builtin=builtin, overwrite=overwrite)
    if as_json:
        _emit_json(manifest)
        return
    for s in manifest["steps"]:
        out.print(f"{s['step']:>20}: {s['before']} -> {s['after']}")
    d, c = manifest["documents"], manifest["characters"]
    out.print(f"wrote {out_dir}: {d['train']} train / {d['val']} val documents, {c['train'] + c['val']:,} characters")


def _prepare_images(inputs: list[Path], out_dir: Path, builtin: list[str] | None, options: dict, overwrite: bool, as_json: bool) -> None:
    from aigc.config import from_dict
    from aigc.data.images import ImagePrepareOptions, prepare

    opts = from_dict(ImagePrepareOptions, options)
    with err.status("preparing images"):
        manifest = prepare(inputs, out_dir, opts, builtin=builtin, overwrite=overwrite)
    if as_json:
        _emit_json(manifest)
        return
    n = manifest["images"]
    out.print(f"wrote {out_dir}: {n['train']} train / {n['val']} val images of {opts.size}x{opts.size} {opts.mode}"
              f"; {len(manifest['classes'])} classes{', captions' if manifest['captions'] else ''}")
    if manifest["skipped"]:
        out.print(f"skipped {n['skipped']} unusable files (listed in manifest.json):")
        for item in manifest["skipped"][:10]:
            out.print(f"  {item['file']}: {item['reason']}", markup=False, highlight=False)


def _prepare_music(inputs: list[Path], out_dir: Path, builtin: list[str] | None, count: int, transpose: str,
                   val_fraction: float, seed: int, overwrite: bool, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from aigc.config import from_dict
    from aigc.data.music import MusicPrepareOptions, prepare

    try:
        low, high = (int(x) for x in transpose.split(":"))
    except ValueError:
        raise UserError(f"--transpose: write LOW:HIGH in semitones, e.g. -5:6 (got {transpose!r})") from None
    opts = from_dict(MusicPrepareOptions, {"val_fraction": val_fraction, "seed": seed, "limit": count, "transpose": [low, high]})
    bar = Progress(TextColumn("[bold]reading scores"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), console=err, transient=True)
    task = bar.add_task("read", total=None)
    with bar:
        manifest = prepare(inputs, out_dir, opts, builtin=builtin, overwrite=overwrite,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        _emit_json(manifest)
        return
    n, notes = manifest["pieces"], manifest["notes"]
    out.print(f"wrote {out_dir}: {n['train']} train / {n['val']} val pieces, {notes['train'] + notes['val']:,} notes, "
              f"{manifest['tokens_per_piece']['mean']:.0f} tokens per piece; transposition {low:+d}..{high:+d}")
    if manifest["skipped"]:
        out.print(f"skipped {n['skipped']} unusable files (listed in manifest.json):")
        for item in manifest["skipped"][:10]:
            out.print(f"  {item['file']}: {item['reason']}", markup=False, highlight=False)


# ---------------------------------------------------------------- train

def _resolve_config(name: str, modality: str = "text") -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (BUILTIN_CONFIGS / f"{name}.yaml", BUILTIN_CONFIGS / modality / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(q.stem for q in BUILTIN_CONFIGS.glob(f"{modality}/*.yaml"))
    raise UserError(f"config not found: {name} (built-in {modality} configs: {', '.join(names)})")


def _run_config(cls, ctx_args: list[str], config: str | None, data: Path | None, run: Path | None, resume: bool,
                overwrite: bool, modality: str, prepare_run) -> tuple[object, Path]:
    """The resolved config and run directory of a `train` verb: a new run (prepared here, by rank 0 of a distributed
    job; ``prepare_run`` None only resolves it) or a resume."""
    import time

    from aigc import distributed
    from aigc.config import load_config, load_yaml, parse_overrides

    extra = list(ctx_args)
    if config and config.startswith("--"):  # click hands the first unknown option to the optional positional
        extra.insert(0, config)
        config = None
    overrides = parse_overrides(extra)
    if run is None:
        if resume:
            raise UserError("--resume needs --run RUN_DIR")
        run = Path("runs") / time.strftime(f"{modality}-%Y%m%d-%H%M%S")
    if resume:
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run}: nothing to resume (no config.yaml); start it without --resume")
        if config or data or set(overrides) - {"train"}:
            raise UserError("--resume continues with the run's saved config; only --train.* settings may change "
                            "(to extend a run: --train.max_steps=N)")
        cfg = load_config(cls, base=load_yaml(run / "config.yaml"), overrides=overrides)
        if overrides and prepare_run is not None:
            from dataclasses import asdict

            from aigc.config import save_yaml

            distributed.on_main(save_yaml, asdict(cfg), run / "config.yaml")
    else:
        if data is not None:
            overrides.setdefault("data", {})["path"] = str(data)
        cfg = load_config(cls, _resolve_config(config, modality) if config else None, overrides)
        if prepare_run is not None:
            distributed.on_main(prepare_run, cfg, run, overwrite=overwrite)
    return cfg, run


DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
TrainDeviceOpt = Annotated[Optional[str], typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; the same as --train.device.")]
RunOpt = Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="Run directory to create or resume (--run-dir under torchrun, whose parser takes --run for its own --run-path).")]
NprocOpt = Annotated[int, typer.Option("--nproc", help="Train on N processes of this machine (DDP; re-runs the command under torchrun).")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", help="Machines in the job (each runs the same command with its --node-rank).")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", help="This machine's place in the job, 0 to nnodes-1.")]
MasterAddrOpt = Annotated[str, typer.Option("--master-addr", help="Host of node 0, reachable from every node.")]
MasterPortOpt = Annotated[int, typer.Option("--master-port", help="A free port on node 0, the same on every node (0: any free one, single node only).")]
OversubscribeOpt = Annotated[bool, typer.Option("--oversubscribe", help="Allow more processes than CPU cores.")]


def _train_lora_sd(args: list[str], data: Path | None, run: Path | None, resume: bool, overwrite: bool, as_json: bool,
                   device: str | None) -> None:
    from dataclasses import fields

    from aigc.train.sd_lora import LoraConfig, train

    got = _dotted(args, ("init", "lora"), allowed=("--init.path, --init.config, --lora." + ", --lora.".join(
        f.name for f in fields(LoraConfig)))) or {}
    if run is None:
        raise UserError("give the run directory to write (--run)")
    if not resume and ("init.path" not in got or data is None):
        raise UserError("lora-sd needs --init.path PIPELINE and --data FOLDER (images with captions)")
    cfg = LoraConfig()
    for key, value in got.items():
        if key.startswith("lora."):
            name = key.split(".", 1)[1]
            kinds = {f.name: f.type for f in fields(LoraConfig)}
            if name not in kinds:
                raise UserError(f"unknown --{key}: lora settings are {', '.join(kinds)}")
            current = getattr(cfg, name)
            try:
                setattr(cfg, name, (value.lower() in ("1", "true", "yes", "on")) if isinstance(current, bool) else type(current)(value))
            except ValueError:
                raise UserError(f"--{key}: expected a {type(current).__name__}, got {value!r}") from None
    with err.status("training the LoRA adapter"):
        summary = train(got.get("init.path", ""), data or "", run, cfg, got.get("init.config"), resume=resume,
                        overwrite=overwrite, device=device or "auto")
    if as_json:
        _emit_json(summary)
        return
    out.print(f"trained a LoRA adapter for {summary['steps']} steps in {summary['elapsed_s']} s (loss {summary['loss']}) on "
              f"{summary['images']} images; adapter: {summary['adapter']}; run directory: {run}", markup=False, highlight=False)


def _dotted(args: list[str], sections: tuple[str, ...], allowed: str = "--init.path, --init.config, --sd.width, "
            "--sd.height, --sd.steps, --sd.guidance, --sd.scheduler, --sd.negative_prompt") -> dict | None:
    """``--section.key=value`` / ``--section.key value`` options of ``sections`` from ``args``: {"section.key": value}, or
    None when there is none; anything else in ``args`` is an error naming it."""
    got, rest, i = {}, [], 0
    while i < len(args):
        a = args[i]
        name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if name.split(".", 1)[0] in sections and "." in name:
            if "=" in a:
                got[name] = a.split("=", 1)[1]
            elif i + 1 < len(args):
                got[name], i = args[i + 1], i + 1
            else:
                raise UserError(f"--{name} needs a value")
        else:
            rest.append(a)
        i += 1
    if not got:
        return None
    unknown = [k for k in got if k.split(".", 1)[0] == "init" and k not in ("init.path", "init.config")]
    if unknown or rest:
        raise UserError(f"unknown option {'--' + unknown[0] if unknown else rest[0]} (allowed: {allowed})")
    return got


def _train_verb(modality: str, cls, prepare_run, train_fn, ctx_args: list[str], device: str | None, config: str | None,
                data: Path | None, run: Path | None, resume: bool, overwrite: bool, as_json: bool, keys: tuple[str, ...],
                launch) -> dict | None:
    """A `train` verb: in one process, or launched on several (``--nproc``/``--nnodes``: checked here, then the
    same command under torchrun), or as one rank of a torchrun job. The summary, or None where this process is
    not the one that reports (a launcher whose job ran, a rank other than 0)."""
    import shlex

    from aigc import devices, distributed

    ctx_args = list(ctx_args) + ([f"--train.device={device}"] if device is not None else [])  # --device is --train.device
    if launch.wanted:
        cfg, run = _run_config(cls, ctx_args, config, data, run, resume, overwrite, modality, None)
        device = devices.resolve(cfg.train.device, "train.device")
        distributed.check_launch(launch, device)
        world = distributed.World(0, launch.world_size, 0)
        distributed.check_batch(cfg.train.batch_size, world)
        if modality == "image" and cfg.model.kind == "dcgan":
            from aigc.train.gan import DISTRIBUTED_REFUSAL

            raise UserError(DISTRIBUTED_REFUSAL)
        ckpt = run / "checkpoints" / "last.pt"
        if resume and ckpt.is_file():
            import torch

            distributed.check_resume(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["state"], world)
        if not resume and launch.node_rank == 0:  # what rank 0 would refuse, refused before the processes start
            from aigc.data import store

            try:
                store.check_writable(run, overwrite)
            except UserError:
                raise UserError(f"run directory {run} already exists; use --resume to continue it or --overwrite to start over") from None
            if cfg.data.path and not Path(cfg.data.path).exists():
                raise UserError(f"data not found: {cfg.data.path}")
        # every rank must use the same run directory: named once, here (--run-dir: torchrun would take --run as its own)
        argv = distributed.strip_flag(sys.argv[1:], ("--run", "--run-dir")) + ["--run-dir", str(run)]
        rc = distributed.launch(launch, argv)
        if rc:
            again = (f" Continue from the last checkpoint with: aigc train {modality} --resume --run {shlex.quote(str(run))} "
                     f"--nproc {launch.nproc}" + (f" --nnodes {launch.nnodes}" if launch.nnodes > 1 else "")) if ckpt.is_file() else ""
            raise UserError(f"the distributed job stopped (exit status {rc}): a process failed or was killed, see its "
                            f"messages above.{again}")
        return None
    world = distributed.start()
    if world.active and run is None:
        raise UserError("a distributed job needs --run RUN_DIR (the same on every process)")
    try:
        cfg, run = _run_config(cls, ctx_args, config, data, run, resume, overwrite, modality, prepare_run)
        if not world.main:
            train_fn(cfg, run, resume=resume, progress=None)
            return None
        return _train(modality, train_fn, cfg, run, resume, as_json, keys)
    finally:
        distributed.stop()


def _training_progress(transient: bool, keys: tuple[str, ...]):
    """A bar over the run's progress (0..1: steps or the time budget, whichever ends it first), with an ETA."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]training"), BarColumn(), TaskProgressColumn(), TextColumn("step {task.fields[step]}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=err, transient=transient)
    task = bar.add_task("train", total=1.0, info="", step=0)
    last: dict = {}

    def progress(step: int, done: float, record: dict) -> None:
        last.update({k: v for k, v in record.items() if k in keys})
        bar.update(task, completed=done, step=step, info=" ".join(f"{k} {v:.4f}" for k, v in last.items()))

    return bar, progress


def _train(modality: str, train_fn, cfg, run: Path, resume: bool, as_json: bool, keys: tuple[str, ...]) -> dict:
    """Run a training loop under a progress bar. Ctrl-C or SIGTERM: the loop checkpoints the step it is on,
    this prints the command that continues it and exits 130."""
    import shlex

    if resume and not (run / "checkpoints" / "last.pt").is_file():
        err.print(f"{run} has no checkpoint yet: starting from step 0", markup=False, highlight=False)
    bar, progress = _training_progress(as_json, keys)
    with bar:
        summary = train_fn(cfg, run, resume=resume, progress=progress)
    summary["run"] = str(run)
    if summary.get("stopped") == "interrupted":
        if as_json:
            _emit_json(summary)
        err.print(f"interrupted at step {summary['steps']}: checkpoint saved. Resume with: "
                  f"aigc train {modality} --resume --run {shlex.quote(str(run))}", markup=False, highlight=False)
        sys.exit(130)  # not typer.Exit: main() says "interrupted" for a 130 that nothing has explained
    return summary


def _stopped(summary: dict) -> str:
    from aigc.train.common import STOP_REASONS

    return STOP_REASONS.get(summary.get("stopped", ""), summary.get("stopped", ""))


@train_app.command("text", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_text(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Argument(help="YAML config file or built-in name (char-small, bpe-small, tiny, lora-smollm2, sft-smollm2, sft-smollm2-lora, dpo-smollm2).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared corpus folder (from `aigc data prepare`).")] = None,
    run: RunOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first.")] = False,
    device: TrainDeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    nproc: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1",
    master_port: MasterPortOpt = 0,
    oversubscribe: OversubscribeOpt = False,
):
    """Pretrain or fine-tune a decoder LM; `task: sft` or `dpo` tunes a pretrained model on conversations or preference pairs. Override any config key with --section.key=value."""
    from aigc.distributed import Launch
    from aigc.train.text import TextTrainConfig, prepare_run, train

    summary = _train_verb("text", TextTrainConfig, prepare_run, train, ctx.args, device, config, data, run, resume, overwrite, as_json,
                          ("loss", "val_loss"), Launch(nproc, nnodes, node_rank, master_addr, master_port, oversubscribe))
    if summary is None:
        return
    run = Path(summary["run"])
    if as_json:
        _emit_json(summary)
    else:
        out.print(f"trained {summary['steps']} steps in {summary['elapsed_s']} s ({_stopped(summary)}); "
                  f"best val loss {summary['best_val_loss']:.4f}; run directory: {run}", markup=False, highlight=False)


@train_app.command("image", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_image(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Argument(help="YAML config file or built-in name (ddpm-shapes, vae-digits, dcgan-digits, tiny, ...).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared image folder (from `aigc data prepare --kind image`).")] = None,
    run: RunOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    device: TrainDeviceOpt = None,
    nproc: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1",
    master_port: MasterPortOpt = 0,
    oversubscribe: OversubscribeOpt = False,
):
    """Train a DCGAN, VAE or diffusion model on images, or make a run of a pretrained Stable Diffusion-family pipeline on
    this machine (--init.path DIR_OR_FILE; --init.config DIR for a single file; --sd.width=... and the like for its
    defaults). Override any config key with --section.key=value."""
    from aigc.distributed import Launch
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    args = list(ctx.args)
    if config and config.startswith("--"):  # click hands the first unknown option to the optional positional
        args.insert(0, config)
        config = None if _dotted(args, ("init", "sd")) is not None else config
    if config == "lora-sd":
        return _train_lora_sd(args, data, run, resume, overwrite, as_json, device)
    sd_args = _dotted(args, ("init", "sd"))
    if sd_args is not None:
        from aigc.train.sd import import_pipeline

        if config not in (None, "sd") or data is not None or resume:
            raise UserError("--init.path makes a run of a pretrained pipeline: give no config, --data or --resume with it")
        if "init.path" not in sd_args:
            raise UserError("--init.* needs --init.path DIR_OR_FILE (a diffusers pipeline folder or a .safetensors file)")
        if run is None:
            raise UserError("give the run directory to write (--run)")
        with err.status("loading the pipeline"):
            summary = import_pipeline(sd_args.pop("init.path"), run, sd_args.pop("init.config", None), overwrite,
                                      {k.split(".", 1)[1]: v for k, v in sd_args.items() if k.startswith("sd.")})
        if as_json:
            _emit_json(summary)
        else:
            out.print(f"run {summary['run']}: {summary['pipeline']} ({summary['family']}, {summary['format']}) from "
                      f"{summary['init_path']}, {summary['width']}x{summary['height']}", markup=False, highlight=False)
        return

    summary = _train_verb("image", ImageTrainConfig, prepare_run, train, ctx.args, device, config, data, run, resume, overwrite, as_json,
                          ("loss", "val_loss", "loss_d", "loss_g"), Launch(nproc, nnodes, node_rank, master_addr, master_port, oversubscribe))
    if summary is None:
        return
    run = Path(summary["run"])
    if as_json:
        _emit_json(summary)
    else:
        val = f"; best val loss {summary['best_val_loss']:.4f}" if "best_val_loss" in summary else ""
        out.print(f"trained {summary['kind']} for {summary['steps']} steps in {summary['elapsed_s']} s ({_stopped(summary)}){val}; "
                  f"samples: {run / 'samples.png'}; run directory: {run}", markup=False, highlight=False)


@train_app.command("music", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_music(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Argument(help="YAML config file or built-in name (chorale-small, tiny).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared music folder (from `aigc data prepare --kind music`).")] = None,
    run: RunOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    device: TrainDeviceOpt = None,
    nproc: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1",
    master_port: MasterPortOpt = 0,
    oversubscribe: OversubscribeOpt = False,
):
    """Train the music model (a decoder transformer over event tokens). Override any config key with --section.key=value."""
    from aigc.distributed import Launch
    from aigc.train.music import MusicTrainConfig, prepare_run, train

    _quiet_libraries()
    summary = _train_verb("music", MusicTrainConfig, prepare_run, train, ctx.args, device, config, data, run, resume, overwrite, as_json,
                          ("loss", "val_loss"), Launch(nproc, nnodes, node_rank, master_addr, master_port, oversubscribe))
    if summary is None:
        return
    run = Path(summary["run"])
    if as_json:
        _emit_json(summary)
    else:
        out.print(f"trained {summary['steps']} steps in {summary['elapsed_s']} s ({_stopped(summary)}); "
                  f"best val loss {summary['best_val_loss']:.4f} nats/token; run directory: {run}", markup=False, highlight=False)


# ---------------------------------------------------------------- generate

def _parse_vars(pairs: list[str], flag: str = "--var") -> dict:
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"{flag} {pair!r}: write NAME=VALUE")
        k, v = pair.split("=", 1)
        values[k.strip()] = v
    return values


@generate_app.command("text")
def generate_text(
    run: Annotated[Path, typer.Argument(help="Run directory (or a Hugging Face model folder).")],
    prompt: Annotated[str, typer.Option(help="Prompt text (empty: start a new document).")] = "",
    template: Annotated[Optional[str], typer.Option(help="Prompt template: built-in name or YAML file.")] = None,
    var: Annotated[Optional[list[str]], typer.Option("--var", help="Template variable NAME=VALUE (repeatable).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (0: greedy).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely tokens (0: off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (1: off).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="> 1 discourages repeats.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed: the same seed gives the same output.")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 1,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    watermark: Annotated[bool, typer.Option(help="Green-list watermark keyed to this machine (detect with `aigc verify`).")] = True,
    chat: Annotated[Optional[str], typer.Option(help="A user message, answered through the model's chat template (an SFT run's).")] = None,
    system: Annotated[Optional[str], typer.Option(help="With --chat: a system message before it.")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print completions as JSON.")] = False,
):
    """Generate text from a trained run, from a prompt, a vertical template or (--chat) a conversation."""
    threads.configure()
    from aigc.generate import templates
    from aigc.generate.text import SamplingParams, TextGenerator

    settings: dict = {}
    if template:
        tpl = templates.load(template)
        prompt = tpl.render(_parse_vars(var or []))
        settings.update(tpl.sampling)
    elif var:
        raise UserError("--var needs --template")
    if chat is not None and (prompt or template):
        raise UserError("--chat is the prompt of a conversation: leave out --prompt and --template")
    if system is not None and chat is None:
        raise UserError("--system needs --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat or ""}]
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "repetition_penalty": repetition_penalty, "stop": stop or None, "seed": seed}
    settings.update({k: v for k, v in given.items() if v is not None})
    settings["n"] = n
    from aigc.config import from_dict

    params = from_dict(SamplingParams, settings)
    if watermark:
        params.watermark = _local_mark()
    with err.status("loading the model"):
        gen = TextGenerator.from_path(run, device=device)
    source = gen.encode_chat(messages) if chat is not None else prompt  # chat: the ids training used, answer only shown
    echo = "" if chat is not None else prompt
    if as_json or not stream:
        outs = gen.generate([source], params)
        if as_json:
            head = {"chat": True, "messages": messages} if chat is not None else {"prompt": prompt}
            _emit_json({**head, "completions": [o.__dict__ for o in outs]})
        else:
            for o in outs:
                sys.stdout.write(echo + o.text + "\n")
        return
    for index in range(n):  # one sample at a time, so each streams in order
        sample = from_dict(SamplingParams, {**settings, "n": 1, "seed": None if seed is None else seed + index})
        sample.watermark = params.watermark
        sys.stdout.write(echo)
        for _, delta, _ in gen.stream([source], sample):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n" if index == n - 1 else "\n\n----\n\n")
    sys.stdout.flush()


@generate_app.command("image")
def generate_image(
    run: Annotated[Path, typer.Argument(help="Image run directory.")],
    cls: Annotated[Optional[list[str]], typer.Option("--class", help="Class to draw (repeat: one per image).")] = None,
    caption: Annotated[Optional[list[str]], typer.Option("--caption", help="Caption to draw (repeat: one per image).")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 8,
    seed: Annotated[int, typer.Option(help="Image i uses seed + i.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Diffusion: denoising steps (default: the run's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Diffusion: classifier-free guidance scale (1: none).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Diffusion: ddim or ddpm.")] = None,
    size: Annotated[int, typer.Option(help="Delivery size: images are upscaled to size x size (0: model size).")] = 256,
    upscale_method: Annotated[str, typer.Option("--upscale", help="lanczos, bicubic or nearest.")] = "lanczos",
    interpolate: Annotated[Optional[tuple[int, int]], typer.Option(help="Morph between two seeds: --interpolate A B.")] = None,
    frames: Annotated[int, typer.Option(help="Frames of an interpolation.")] = 8,
    gif: Annotated[bool, typer.Option("--gif", help="Also write the interpolation as an animated GIF.")] = False,
    image_format: Annotated[str, typer.Option("--format", help="png or jpeg (each watermarked, described and C2PA-signed).")] = "png",
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/generated).")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the written files as JSON.")] = False,
    prompt: Annotated[Optional[str], typer.Option(help="Stable Diffusion runs: the prompt.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Stable Diffusion runs: what to keep out (default: the run's).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Stable Diffusion runs: dpm++ 2m karras, euler a, ddim, unipc, lcm, ... (default: the run's).")] = None,
    width: Annotated[int, typer.Option(help="Stable Diffusion runs: width in pixels (0: the run's).")] = 0,
    height: Annotated[int, typer.Option(help="Stable Diffusion runs: height in pixels (0: the run's).")] = 0,
    init_image: Annotated[Optional[Path], typer.Option(help="Stable Diffusion runs: image-to-image from this image.")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Stable Diffusion runs: inpaint where this mask is white (with --init-image).")] = None,
    strength: Annotated[float, typer.Option(help="Stable Diffusion runs: how much of --init-image is repainted (0-1].")] = 0.75,
):
    """Generate images by class or caption, or a latent interpolation strip, upscaled to a delivery size; from a Stable
    Diffusion run, by prompt: text-to-image, image-to-image (--init-image) or inpainting (--mask)."""
    threads.configure()
    import numpy as np

    from aigc.run import SD, detect_kind

    if detect_kind(run) == SD:
        return _generate_sd(run, prompt or " ".join(caption or []), negative_prompt, scheduler, n, seed, steps, guidance,
                            width, height, init_image, mask, strength, image_format, out_dir, device, as_json)

    from aigc.generate.image import ImagePipeline, grid, save_gif, save_png, upscale
    from aigc.govern import delivery
    from aigc.govern.delivery import unused_path

    if size < 0 or size > 4096:
        raise UserError(f"--size must be between 0 and 4096, got {size}")
    mime = {"png": delivery.PNG, "jpeg": delivery.JPEG, "jpg": delivery.JPEG}.get(image_format.lower())
    if mime is None:
        raise UserError(f"--format must be png or jpeg, got {image_format!r}")
    pipe = ImagePipeline.from_run(run, device=device)
    out_dir = out_dir or run / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    deliver = size or pipe.meta.size
    written = []
    grid_path = None
    if interpolate:
        a, b = interpolate
        with err.status(f"interpolating {frames} frames"):
            strip = pipe.interpolate(a, b, frames, classes=cls, captions=caption, steps=steps, guidance=guidance)
        big = [upscale(f, deliver, upscale_method) for f in strip]
        stem = unused_path(out_dir, f"interpolate-{a}-{b}", (".png", ".gif"))
        save_png(grid(np.stack(big), ncol=frames, pad=0), stem.with_name(stem.name + ".png"))
        written.append({"file": str(stem.with_name(stem.name + ".png")), "seeds": [a, b], "frames": frames})
        if gif:
            save_gif(big, stem.with_name(stem.name + ".gif"))
            written.append({"file": str(stem.with_name(stem.name + ".gif"))})
    else:
        with err.status(f"generating {n} images"):
            images, labels = pipe.generate(n=n, seed=seed, classes=cls, captions=caption, steps=steps, guidance=guidance, sampler=sampler)
        from aigc.generate.image import to_pil
        from aigc.govern.c2pa import Provenance

        provenance = Provenance.from_settings(_settings())
        version = pipe_version(run)
        suffix = delivery.SUFFIX[mime]
        for i, (img, label) in enumerate(zip(images, labels)):
            path = unused_path(out_dir, f"{seed + i:06d}", (suffix,)).with_suffix(suffix)
            params = {"Steps": steps, "CFG scale": guidance, "Sampler": sampler, "Seed": seed + i, "Size": f"{deliver}x{deliver}",
                      "Model": run.name, "Model hash": version}
            done = delivery.finish(to_pil(upscale(img, deliver, upscale_method)), mime, watermark=True,
                                   parameters=delivery.parameters_text(label or "", params), provenance=provenance,
                                   claim=delivery.Claim(path.name, run.name, version, {"seed": seed + i}))
            done.save(path)
            written.append({"file": str(path), "seed": seed + i, "condition": label, "watermark_id": done.watermark_id,
                            "c2pa": done.signed})
        grid_path = unused_path(out_dir, f"grid-{seed:06d}").with_suffix(".png")
        save_png(grid(images, ncol=min(8, n)), grid_path)
    if as_json:
        _emit_json({"run": str(run), "images": written, "grid": str(grid_path) if grid_path else None})
        return
    for w in written:
        out.print(f"{w['file']}" + (f"  ({w['condition']})" if w.get("condition") else ""), markup=False, highlight=False)


def _generate_sd(run: Path, prompt: str, negative: str | None, scheduler: str | None, n: int, seed: int, steps: int | None,
                 guidance: float | None, width: int, height: int, init_image: Path | None, mask: Path | None, strength: float,
                 image_format: str, out_dir: Path | None, device: str, as_json: bool) -> None:
    from PIL import Image, UnidentifiedImageError

    from aigc import devices
    from aigc.generate.sd import SDParams, SDRun
    from aigc.govern import delivery
    from aigc.govern.c2pa import Provenance
    from aigc.govern.delivery import unused_path
    from aigc.run import SDMeta

    mime = {"png": delivery.PNG, "jpeg": delivery.JPEG, "jpg": delivery.JPEG}.get(image_format.lower())
    if mime is None:
        raise UserError(f"--format must be png or jpeg, got {image_format!r}")
    images_in = {}
    for name, path in (("--init-image", init_image), ("--mask", mask)):
        if path is None:
            continue
        try:
            images_in[name] = Image.open(path)
            images_in[name].load()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{name} {path}: not a readable image ({exc})") from None
    meta = SDMeta.load(run)
    params = SDParams(prompt=prompt, negative_prompt=meta.negative_prompt if negative is None else negative, n=n,
                      steps=steps or meta.steps, guidance=meta.guidance if guidance is None else guidance,
                      width=width or meta.width, height=height or meta.height, seed=seed,
                      scheduler=scheduler or meta.scheduler, strength=strength)
    params.validate()
    with err.status("loading the pipeline"):
        pipe = SDRun.from_run(run, device=str(devices.resolve(device)))
    with err.status(f"generating {n} images"):
        images = pipe.generate(params, init_image=images_in.get("--init-image"), mask=images_in.get("--mask"))
    task = "inpaint" if mask else "img2img" if init_image else "txt2img"
    out_dir = out_dir or run / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance, version, suffix = Provenance.from_settings(_settings()), pipe_version(run), delivery.SUFFIX[mime]
    written = []
    for i, img in enumerate(images):
        path = unused_path(out_dir, f"{task}-{seed + i:06d}", (suffix,)).with_suffix(suffix)
        described = {"Negative prompt": params.negative_prompt or None, "Steps": params.steps, "Sampler": params.scheduler,
                     "CFG scale": params.guidance, "Seed": seed + i, "Size": f"{params.width}x{params.height}",
                     "Denoising strength": params.strength if init_image else None, "Model": run.name, "Model hash": version}
        done = delivery.finish(img, mime, watermark=True, parameters=delivery.parameters_text(prompt, described),
                               provenance=provenance, claim=delivery.Claim(path.name, run.name, version, {"seed": seed + i, "task": task}))
        done.save(path)
        written.append({"file": str(path), "seed": seed + i, "task": task, "watermark_id": done.watermark_id,
                        "c2pa": done.signed})
    if as_json:
        _emit_json({"run": str(run), "images": written})
        return
    for w in written:
        out.print(w["file"], markup=False, highlight=False)


@generate_app.command("music")
def generate_music(
    run: Annotated[Path, typer.Argument(help="Music run directory.")],
    bars: Annotated[int, typer.Option(help="Bars to generate (after the primer's).")] = 8,
    seconds: Annotated[float, typer.Option(help="Generate enough bars for this many seconds (overrides --bars).")] = 0.0,
    key: Annotated[Optional[str], typer.Option(help="Key, e.g. 'G major' or 'e minor' (default: the model chooses).")] = None,
    tempo: Annotated[Optional[int], typer.Option(help="Quarter notes per minute (default: the run's most common).")] = None,
    time_signature: Annotated[Optional[str], typer.Option(help="e.g. 3/4 (default: the run's most common).")] = None,
    primer: Annotated[Optional[Path], typer.Option(help="MIDI or MusicXML file to continue.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.9,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sample i uses seed + i.")] = 0,
    n: Annotated[int, typer.Option("--n", help="Number of pieces.")] = 1,
    synth: Annotated[str, typer.Option(help="auto (FluidSynth when installed), builtin or fluidsynth.")] = "auto",
    soundfont: Annotated[Optional[Path], typer.Option(help="A General MIDI .sf2 for FluidSynth.")] = None,
    wav: Annotated[bool, typer.Option(help="Also render 44.1 kHz WAV audio (watermarked and C2PA-signed).")] = True,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/generated).")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the written files as JSON.")] = False,
):
    """Generate music: MIDI plus WAV audio, unconditionally or continuing a primer, with key, length and tempo controls."""
    threads.configure()
    import hashlib

    from aigc.config import from_dict
    from aigc.data.music import read_score
    from aigc.generate.music import MusicParams, MusicPipeline, key_label, render_wav
    from aigc.govern import delivery
    from aigc.govern.delivery import unused_path

    _quiet_libraries()
    if n < 1 or n > 100:
        raise UserError(f"--n must be between 1 and 100, got {n}")
    primer_piece = None
    if primer is not None:
        if not primer.is_file():
            raise UserError(f"primer not found: {primer}")
        try:
            primer_piece = read_score(primer)
        except ValueError as e:
            raise UserError(f"{primer}: {e}") from None
    pipe = MusicPipeline.from_run(run, device=device)
    out_dir = out_dir or run / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = None
    if wav:
        from aigc.govern.c2pa import Provenance

        provenance = Provenance.from_settings(_settings())
    version = pipe_version(run)
    written = []
    for i in range(n):
        params = from_dict(MusicParams, {"bars": bars, "seconds": seconds, "key": key, "tempo": tempo, "time_signature": time_signature,
                                         "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed + i})
        params.primer = primer_piece
        with err.status(f"composing piece {i + 1} of {n}"):
            result = pipe.generate(params)
        stem = unused_path(out_dir, f"music-{seed + i:06d}", (".mid", ".wav"))
        midi = result.midi_bytes()
        result.write_midi(stem.with_suffix(".mid"))
        entry = {"midi": str(stem.with_suffix(".mid")), "seed": seed + i, "key": key_label(result.piece), "tempo": result.tempo,
                 "time_signature": result.piece.time_signature, "bars": bars, "primer_bars": result.primer_bars,
                 "notes": len(result.piece.notes), "seconds": round(result.seconds, 2), "elapsed_s": round(result.elapsed_s, 2)}
        if wav:
            audio, used = render_wav(result.piece, result.tempo, result.program, synth, str(soundfont or ""))
            done = delivery.finish(audio, delivery.WAV, provenance=provenance, watermark=True, audio_key=_audio_key(),
                                   claim=delivery.Claim(stem.name + ".wav", run.name, version,
                                                        {"seed": seed + i, "midi_sha256": hashlib.sha256(midi).hexdigest()}))
            done.save(stem.with_suffix(".wav"))
            entry.update(wav=str(stem.with_suffix(".wav")), synth=used, c2pa=True, watermark_id=done.watermark_id)
        written.append(entry)
    if as_json:
        _emit_json({"run": str(run), "pieces": written})
        return
    for w in written:
        out.print(f"{w['midi']}" + (f" + {Path(w['wav']).name} ({w['synth']})" if wav else "")
                  + f"  {w['key']}, {w['time_signature']}, {w['tempo']} bpm, {w['seconds']} s, {w['notes']} notes",
                  markup=False, highlight=False)


@generate_app.command("speech")
def generate_speech(
    text: Annotated[Optional[str], typer.Argument(help="What to say (or --text-file; - reads stdin).")] = None,
    voice: Annotated[str, typer.Option(help="A voice of --list-voices, or auto (the default voice for the text's language).")] = "auto",
    speed: Annotated[float, typer.Option(help="0.25 to 4.0 times the voice's own pace.")] = 1.0,
    audio_format: Annotated[str, typer.Option("--format", help="wav, mp3 or flac (each watermarked and C2PA-signed).")] = "wav",
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default: speech.FORMAT here, or speech-2, ...).")] = None,
    text_file: Annotated[Optional[Path], typer.Option(help="Read the text from this UTF-8 file.")] = None,
    list_voices: Annotated[bool, typer.Option("--list-voices", help="List the installed voices and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Speak text with a local voice (Piper when installed, eSpeak NG always): a watermarked, C2PA-signed audio file."""
    from aigc.data.audio import write_wav
    from aigc.generate.speech import Speaker
    from aigc.govern import delivery
    from aigc.govern.c2pa import Provenance
    from aigc.govern.delivery import unused_path

    settings = _settings()
    speaker = Speaker(settings.voices_dir)
    if list_voices:
        rows = [v.to_dict() for v in speaker.available]
        if as_json:
            _emit_json({"voices": rows})
        else:
            for r in rows:
                out.print(f"{r['id']:14} {r['engine']:7} {r['language']:4} {r['sample_rate']} Hz  {r['license']}", markup=False)
        return
    mimes = {"wav": delivery.WAV, "mp3": delivery.MP3, "flac": delivery.FLAC}
    if audio_format not in mimes:
        raise UserError(f"--format must be one of {', '.join(mimes)}, got {audio_format!r}")
    if text_file is not None:
        if not text_file.is_file():
            raise UserError(f"--text-file: file not found: {text_file}")
        text = text_file.read_text(encoding="utf-8")
    elif text == "-":
        text = sys.stdin.read()
    if not text:
        raise UserError("give the text to say (an argument, - for stdin, or --text-file)")
    with err.status("speaking"):
        audio, rate, used = speaker.speak(text, voice, speed)
        done = delivery.finish(write_wav(audio, rate), mimes[audio_format], watermark=True, audio_key=_audio_key(),
                               provenance=Provenance.from_settings(settings),
                               claim=delivery.Claim(f"speech.{audio_format}", f"speech:{used.name}", used.engine,
                                                    {"voice": used.name, "speed": speed}))
    path = out_file or unused_path(Path.cwd(), "speech", (f".{audio_format}",)).with_suffix(f".{audio_format}")
    done.save(path)
    summary = {"file": str(path), "voice": used.name, "engine": used.engine, "seconds": round(len(audio) / rate, 3),
               "sample_rate": rate, "format": audio_format, "watermark_id": done.watermark_id, "c2pa": done.signed}
    if as_json:
        _emit_json(summary)
        return
    out.print(f"wrote {path}: {summary['seconds']} s, voice {used.name} ({used.engine})"
              + (f", watermark id {done.watermark_id}" if done.watermark_id is not None else ", too short to watermark"),
              markup=False, highlight=False)


@generate_app.command("video")
def generate_video(
    image_run: Annotated[Path, typer.Argument(help="Image run directory (renders the frames).")],
    prompt: Annotated[str, typer.Option(help="What the video is about; 'A; then B' writes the scenes directly.")] = "",
    text_run: Annotated[Optional[Path], typer.Option(help="Text run that writes the storyboard (one line per scene).")] = None,
    music_run: Annotated[Optional[Path], typer.Option(help="Music run that scores the soundtrack (none: a silent video).")] = None,
    scene: Annotated[Optional[list[str]], typer.Option("--scene", help="A scene's text (repeat; overrides the storyboard writer).")] = None,
    scenes: Annotated[int, typer.Option(help="Number of scenes the text model writes.")] = 3,
    seconds: Annotated[float, typer.Option(help="Duration in seconds.")] = 6.0,
    fps: Annotated[int, typer.Option(help="Frames per second.")] = 12,
    size: Annotated[int, typer.Option(help="Frame side in pixels (square).")] = 256,
    captions: Annotated[bool, typer.Option("--captions", help="Burn the scene text into the frames.")] = False,
    seed: Annotated[int, typer.Option(help="Scene i's key frame uses seed + i; the storyboard and soundtrack use it too.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Diffusion: denoising steps per frame (default: the run's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Diffusion: guidance scale.")] = None,
    key: Annotated[Optional[str], typer.Option(help="Soundtrack key, e.g. 'D minor'.")] = None,
    tempo: Annotated[Optional[int], typer.Option(help="Soundtrack tempo (quarter notes per minute).")] = None,
    synth: Annotated[str, typer.Option(help="Soundtrack synthesizer: auto, builtin or fluidsynth.")] = "auto",
    chroma: Annotated[str, typer.Option(help="420 (plays everywhere) or 444 (keeps the frames' watermark readable).")] = "420",
    voice: Annotated[str, typer.Option(help="A voice-over of the scene lines with this voice (see generate speech --list-voices; auto: by language).")] = "",
    voice_speed: Annotated[float, typer.Option(help="Pace of the voice-over, 0.25 to 4.0.")] = 1.0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: IMAGE_RUN/video-SEED).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Compose a video: storyboard -> key frames -> latent interpolation -> soundtrack -> H.264 + AAC MP4 (C2PA-signed)."""
    threads.configure()
    from dataclasses import asdict

    from aigc.config import from_dict
    from aigc.generate.video import VideoParams, compose
    from aigc.govern import delivery
    from aigc.govern.c2pa import Provenance

    _quiet_libraries()
    params = from_dict(VideoParams, {"device": device, "prompt": prompt, "scenes": scenes, "scene_texts": list(scene or []), "seconds": seconds,
                                     "fps": fps, "size": size, "captions": captions, "seed": seed, "steps": steps,
                                     "guidance": guidance, "key": key, "tempo": tempo, "synth": synth, "chroma": chroma,
                                     "voice": voice, "voice_speed": voice_speed})
    out_dir = out_dir or image_run / f"video-{seed}"
    with err.status("composing video"):
        result = compose(image_run, out_dir, params, text_run=text_run, music_run=music_run, overwrite=overwrite,
                         audio_key=_audio_key(), voices_dir=_settings().voices_dir)
    delivery.finish(result.mp4, delivery.MP4, watermark_id=result.watermark_id, audio_marked=result.audio_marked,
                    provenance=Provenance.from_settings(_settings()),
                    claim=delivery.Claim("video.mp4", image_run.name, pipe_version(image_run),
                                         {"seed": seed, "text_run": str(text_run or ""), "music_run": str(music_run or "")})
                    ).save(out_dir / "video.mp4")
    summary = {"video": str(out_dir / "video.mp4"), "folder": str(out_dir), "frames": result.frames, "seconds": round(result.seconds, 3),
               "fps": fps, "size": size, "audio": result.audio, "watermark_id": result.watermark_id,
               "audio_watermark": result.audio_marked, "c2pa": True,
               "scenes": [asdict(s) for s in result.storyboard], "timings": result.timings}
    if as_json:
        _emit_json(summary)
        return
    for s in result.storyboard:
        out.print(f"scene {s.index + 1} ({s.start_s:.1f}-{s.end_s:.1f} s): {s.text!r} -> {s.condition or 'unconditional'} [{s.reason}]",
                  markup=False, highlight=False)
    out.print(f"wrote {out_dir / 'video.mp4'}: {result.frames} frames at {fps} fps, {size}x{size}"
              f"{', with soundtrack' if result.audio else ', silent'}; intermediates in {out_dir}", markup=False, highlight=False)


def pipe_version(run: Path) -> str:
    """The same model version the server reports for this run."""
    return fingerprint(run).version


def _existing_secret(home: Path, name: str) -> bytes | None:
    """A secret of ``home`` if it has one (a checker never mints one: it would read with a key nothing was marked with)."""
    from aigc.govern.crypto import secret

    return secret(home, name) if (Path(home) / "keys" / f"{name}.key").is_file() else None


def _audio_key() -> bytes:
    """The secret of the inaudible watermark in audio made with this data folder (the server's, when they share it)."""
    from aigc.govern.crypto import secret

    return secret(_settings().home, "audio-watermark")


def _local_mark():
    """The text watermark of generations made on this machine outside the server (tenant "local")."""
    from aigc.govern.crypto import secret
    from aigc.govern.text_watermark import Watermark, tenant_key

    return Watermark(tenant_key(secret(_settings().home, "text-watermark"), "local"))


# ---------------------------------------------------------------- eval

@eval_app.command("text")
def eval_text(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    references: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, reference} pairs (default: held-out continuations).")] = None,
    pairs: Annotated[int, typer.Option(help="Held-out documents used as prompt/reference pairs.")] = 20,
    samples: Annotated[int, typer.Option(help="Samples for the diversity metrics.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens generated per prompt (default 100; a chat answer: 256).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens scored for perplexity (0: all).")] = 200_000,
    data: Annotated[Optional[Path], typer.Option(help="A prepared corpus (text, or chat for a chat model) to score instead of the run's own held-out data (compare models on the same data).")] = None,
    checker: Annotated[Optional[str], typer.Option(help="Chat: score answers with MODULE:FUNCTION(prompt_messages, answer) -> dict, or a built-in task (products, exercises, poems). Default: the data's task.")] = None,
    limit: Annotated[int, typer.Option(help="Chat: held-out conversations answered.")] = 100,
    base: Annotated[bool, typer.Option(help="Chat: also score the model the run started from, beside it.")] = True,
    report_dir: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: RUN/eval, or RUN/eval/data-NAME with --data; chat: RUN/eval/chat).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Perplexity, bits/char, BLEU, ROUGE and diversity; for a chat run (SFT, DPO) the task checker's scores, BLEU/ROUGE,
    the share of answers that stop and their lengths, beside the base model's. Writes report.{json,md}."""
    threads.configure()
    if _is_chat_eval(run, data, checker):
        return _eval_chat(run, data, checker, limit, max_new_tokens or 256, base, report_dir, as_json, device)
    from aigc.eval.text import evaluate_run

    bar, progress = _stage_progress()
    with bar:
        report = evaluate_run(run, str(references) if references else None, n_pairs=pairs, n_samples=samples,
                              max_new_tokens=max_new_tokens or 100, max_tokens=max_tokens, seed=seed, progress=progress, data=data,
                              out_dir=report_dir, device=device)
    if as_json:
        _emit_json(report)
        return
    lik, ref, div = report.get("likelihood"), report.get("reference"), report.get("diversity")
    if lik:
        out.print(f"perplexity {lik['perplexity']:.3f}  bits/char {lik['bits_per_char']:.4f}  ({lik['tokens']} tokens)")
    if ref:
        out.print(f"BLEU {ref['bleu']:.2f}  ROUGE-1 {ref['rouge1']:.2f}  ROUGE-2 {ref['rouge2']:.2f}  ROUGE-L {ref['rougeL']:.2f}  ({ref['pairs']} pairs)")
    if div:
        out.print(f"distinct-1 {div['distinct_1']:.3f}  distinct-2 {div['distinct_2']:.3f}  self-BLEU {div['self_bleu']:.2f}")
    if "data" in report:
        out.print(f"scored {report['data']['path']}: {report['data']['tokens']} tokens, "
                  f"{report['data']['unknown_token_rate']:.2%} unknown to this model's tokenizer", markup=False, highlight=False)
    where = report_dir or (run / "eval" / (f"data-{data.name}" if data else ""))
    out.print(f"report: {where / 'report.md'}", markup=False, highlight=False)


def _is_chat_eval(run: Path, data: Path | None, checker: str | None) -> bool:
    import json as _json

    if checker:
        return True
    if data is not None:
        manifest = data / "manifest.json"
        return manifest.is_file() and _json.loads(manifest.read_text()).get("kind") in ("chat", "preference")
    return (run / "data" / "val.records.jsonl").is_file()


def _eval_chat(run: Path, data: Path | None, checker: str | None, limit: int, max_new_tokens: int, base: bool,
               report_dir: Path | None, as_json: bool, device: str = "auto") -> None:
    from aigc.eval.chat import evaluate_chat

    bar, progress = _stage_progress()
    with bar:
        report = evaluate_chat(run, data, checker, limit=limit, max_new_tokens=max_new_tokens, base=base, out_dir=report_dir,
                               progress=progress, device=device)
    if as_json:
        _emit_json(report)
        return
    for side in ("tuned", "base"):
        if side in report:
            shown = "  ".join(f"{k} {v:.3f}" for k, v in report[side].items() if isinstance(v, float))
            out.print(f"{side}: {shown}", markup=False, highlight=False)
    where = report_dir or (run / "eval" / ("chat" if data is None else f"chat-{data.name}"))
    out.print(f"report: {where / 'report.md'}", markup=False, highlight=False)


@eval_app.command("music")
def eval_music(
    run: Annotated[Path, typer.Argument(help="Music run directory.")],
    samples: Annotated[int, typer.Option(help="Pieces generated for the sample statistics (keys cycle through 8).")] = 8,
    bars: Annotated[int, typer.Option(help="Bars per generated piece.")] = 8,
    max_pieces: Annotated[int, typer.Option(help="Held-out pieces scored (0: all).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """NLL per token, note and 16th step on held-out pieces; pitch-class, density, key and polyphony statistics."""
    threads.configure()
    from aigc.eval.music import evaluate_run

    _quiet_libraries()
    if samples < 1 or bars < 1:
        raise UserError("--samples and --bars must be >= 1")
    bar, progress = _stage_progress()
    with bar:
        report = evaluate_run(run, n_samples=samples, bars=bars, seed=seed, max_pieces=max_pieces, progress=progress, device=device)
    if as_json:
        _emit_json(report)
        return
    lik, sa, ho = report["likelihood"], report["samples"], report["heldout"]
    out.print(f"held-out NLL: {lik['nats_per_token']:.4f} nats/token, {lik['nats_per_note']:.4f} nats/note, "
              f"{lik['nats_per_16th_step']:.4f} nats/16th step ({lik['pieces']} pieces, {lik['notes']} notes)")
    out.print(f"samples: in-key {sa['in_key_ratio']:.1%} (held-out {ho['in_key_ratio']:.1%}), pitch-class distance "
              f"{sa['pitch_class_distance']:.3f} (held-out {ho['pitch_class_distance']:.3f}), polyphony {sa['polyphony']} "
              f"(held-out {ho['polyphony']}), key adherence {sa['key_adherence']:.0%}")
    out.print(f"report: {run / 'eval' / 'report.md'}")


@eval_app.command("image")
def eval_image(
    run: Annotated[Path, typer.Argument(help="Image run directory.")],
    n: Annotated[int, typer.Option("--n", help="Generated images scored.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Diffusion: denoising steps (default: the run's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Diffusion: guidance scale (default: the run's).")] = None,
    feature_steps: Annotated[int, typer.Option(help="Training steps of the dataset's feature network (cached per value).")] = 400,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """FID, KID, precision/recall and conditional accuracy; writes eval/report.{json,md} and eval/samples.png."""
    threads.configure()
    from aigc.eval.image import evaluate_run

    bar, progress = _stage_progress()
    with bar:
        report = evaluate_run(run, n=n, seed=seed, steps=steps, guidance=guidance, feature_steps=feature_steps, progress=progress,
                              device=device)
    if as_json:
        _emit_json(report)
        return
    s, floor = report["scores"], report["real_floor"]
    floor_text = f"; held-out real FID {floor['fid']:.3f}" if floor else ""
    out.print(f"FID {s['fid']:.3f}  KID {s['kid']:.4f}  precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
              f"({s['generated_images']} images{floor_text})")
    acc = report["feature_net"]["heldout_accuracy"]
    out.print("feature network held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    if report["conditional_accuracy"]:
        out.print("conditional accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in report["conditional_accuracy"].items()))
    if "shapes_checker" in report:
        c = report["shapes_checker"]
        out.print(f"shapes checker: shape+colour+position {c['accuracy']:.1%}, all four {c['all_attributes']:.1%}")
    out.print(f"report: {run / 'eval' / 'report.md'}")


# ---------------------------------------------------------------- export

@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the standalone Hugging Face model.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
):
    """Write a standalone HF model (LoRA adapters merged into the base weights) with its tokenizer."""
    from aigc.data import store
    from aigc.generate.text import load_model

    model, tokenizer = load_model(run)
    with store.atomic_folder(out_dir, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp), save_jinja_files=False)  # a chat template stays in tokenizer_config.json
    out.print(f"exported {model.num_parameters():,} parameters to {out_dir}")


# ---------------------------------------------------------------- serve, admin, usage

admin_app = typer.Typer(no_args_is_help=True, help="Manage plans, prices, tenants, users and API keys (acts on the database directly).")
plan_app = typer.Typer(no_args_is_help=True, help="Billing plans.")
price_app = typer.Typer(no_args_is_help=True, help="The price book (list prices per model version).")
org_app = typer.Typer(no_args_is_help=True, help="Organisations (tenants).")
user_app = typer.Typer(no_args_is_help=True, help="Users of an organisation.")
key_app = typer.Typer(no_args_is_help=True, help="API keys.")
usage_app = typer.Typer(no_args_is_help=True, help="Usage, revenue, cost and margin.")
for _sub, _name in ((plan_app, "plan"), (price_app, "price"), (org_app, "org"), (user_app, "user"), (key_app, "key")):
    admin_app.add_typer(_sub, name=_name)
app.add_typer(admin_app, name="admin")
app.add_typer(usage_app, name="usage")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Database URL (default: $AIGC_DATABASE_URL or sqlite:///~/.aigc/aigc.db).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings(db: str | None = None, **kw):
    from aigc.settings import Settings

    extra = {k: v for k, v in kw.items() if v is not None}
    if db:
        extra["database_url"] = db
    return Settings(**extra)


def _db_do(db: str | None, fn):
    """Run fn(session) in one transaction on the configured database."""
    from aigc.db.session import open_db

    sessions = open_db(_settings(db).resolved_database_url())
    try:
        with sessions.begin() as s:
            return fn(s)
    finally:
        sessions.kw["bind"].dispose()


def _show(rows, as_json: bool, title: str = "") -> None:
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    rows = rows if isinstance(rows, list) else [rows]
    if not rows:
        out.print(f"(no {title or 'rows'})")
        return
    table = Table(title=title or None)
    for col in rows[0]:
        table.add_column(str(col))
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r.values()])
    out.print(table)


@app.command("serve")
def serve(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Run directories to serve, as PATH or NAME=PATH (id: the folder name).")] = None,
    models_dir: Annotated[Optional[Path], typer.Option(help="Serve every run directory in this folder.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).", min=1, max=65535)] = 8000,
    db: DbOpt = None,
    home: Annotated[Optional[Path], typer.Option(help="Data folder (database, generated images); default ~/.aigc.")] = None,
    echo_model: Annotated[Optional[list[str]], typer.Option(help="Also serve a stub text model under this id (for gateway load tests).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Sequences decoded together per text model.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Where the models compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (AIGC_DEVICE).")] = None,
    model_device: Annotated[Optional[list[str]], typer.Option("--model-device", help="NAME=DEVICE: put one model on another device (repeatable; AIGC_MODEL_DEVICES).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds to let in-flight requests finish on SIGTERM/Ctrl-C.")] = 30.0,
    workers: Annotated[Optional[int], typer.Option(help="Server processes on this host (AIGC_WORKERS); more than 1 needs PostgreSQL.",
                                                   min=1, max=256)] = None,
):
    """Serve trained runs through an OpenAI-compatible API (keys, plans, metering, rate limits, /metrics)."""
    import uvicorn

    from aigc.serve.app import build_registry, create_app, setup_logging
    from aigc.serve.http import uvicorn_options

    import threading
    import time

    settings = _settings(db, home=home, max_batch=max_batch, device=device, workers=workers)
    url = settings.resolved_database_url()
    if settings.workers > 1 and url.startswith("sqlite"):
        raise UserError(f"--workers {settings.workers} needs PostgreSQL: SQLite serves one process (its writers queue on one "
                        "file lock, and rate limits and caches would be per process). Set AIGC_DATABASE_URL="
                        "postgresql+psycopg://USER@HOST/DB (or --db), or serve with one worker.")
    _check_port_free(host, port)
    setup_logging(settings.log_json)
    placements = _parse_vars([p for p in settings.model_devices.split(",") if p.strip()], "AIGC_MODEL_DEVICES")
    placements.update(_parse_vars(model_device or [], "--model-device"))
    main_thread = threading.current_thread()

    def announce(started, names) -> None:  # only once the socket listens: a failed start never claims to serve
        while not started() and main_thread.is_alive():
            time.sleep(0.05)
        if started():
            extra = f", {settings.workers} workers" if settings.workers > 1 else ""
            err.print(f"serving {', '.join(names)} on http://{host}:{port}/v1 (database: "
                      f"{settings.resolved_database_url()}{extra}); Ctrl-C stops it", markup=False, highlight=False)

    if settings.workers > 1:
        _serve_workers(settings, host, port, shutdown_timeout, runs, models_dir, echo_model, placements, announce)
        return
    registry = build_registry(settings, list(runs or []), models_dir, echo_model, placements)
    threads.configure()
    application = create_app(settings, registry)
    config = uvicorn.Config(application, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False, **uvicorn_options(settings))
    config.client_timeout_s = settings.client_timeout_s
    server = uvicorn.Server(config)
    threading.Thread(target=announce, args=(lambda: server.started, list(registry.entries)), daemon=True).start()
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot bind (the port taken since the check) or startup failed
        if e.code:
            raise UserError(f"the server did not start on {host}:{port} (see the log above)") from None
        raise
    if not server.started and not server.should_exit:
        raise UserError(f"the server did not start on {host}:{port} (see the log above)")


def _serve_workers(settings, host: str, port: int, shutdown_timeout: float, runs, models_dir, echo_model, placements,
                   announce) -> None:
    """``aigc serve --workers N``: uvicorn's supervisor runs N worker processes on one socket and starts a new one when
    one dies; each builds its own app (``serve.app.worker_app``) from the environment set here. The schema is migrated
    once, here, before any worker starts; the workers' metrics are summed through files (PROMETHEUS_MULTIPROC_DIR)."""
    import json as _json
    import os
    import shutil
    import socket
    import threading

    import httpx
    import uvicorn

    from aigc.db.session import open_db
    from aigc.serve.http import uvicorn_options

    open_db(settings.resolved_database_url()).kw["bind"].dispose()  # migrate once, not N times at once
    # per host and supervisor: hosts may share AIGC_HOME, and two hosts may give their supervisors the same pid
    metrics_dir = settings.home / "run" / f"metrics-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ.update({
        "AIGC_SERVE_SPEC": _json.dumps({"runs": list(runs or []), "models_dir": str(models_dir) if models_dir else None,
                                        "echo": list(echo_model or []), "placements": placements}),
        "AIGC_HOME": str(settings.home), "AIGC_DATABASE_URL": settings.resolved_database_url(),
        "AIGC_MAX_BATCH": str(settings.max_batch), "AIGC_DEVICE": settings.device, "AIGC_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "AIGC_CLIENT_TIMEOUT_S": str(settings.client_timeout_s),
    })
    names = [r.split("=", 1)[0] if "=" in r else Path(r).name for r in (runs or [])] + list(echo_model or [])
    base = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"

    def ready() -> bool:
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    threading.Thread(target=announce, args=(ready, names), daemon=True).start()
    try:
        uvicorn.run("aigc.serve.app:worker_app", factory=True, host=host, port=port, workers=settings.workers,
                    log_level="warning", timeout_graceful_shutdown=shutdown_timeout, access_log=False,
                    timeout_worker_healthcheck=30, **uvicorn_options(settings))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_port_free(host: str, port: int) -> None:
    """A clear error before anything loads when the port is taken (uvicorn would fail after the models loaded)."""
    import errno
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except PermissionError:
            raise UserError(f"--port {port}: not allowed for this user (ports below 1024 need privileges)") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port} is in use on {host} (another server?): stop it or pick another port") from None
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


@plan_app.command("create")
def plan_create(name: str, kind: Annotated[str, typer.Option(help="subscription, payg or prepaid.")],
                monthly_fee: Annotated[float, typer.Option(help="USD per month (subscription).")] = 0.0,
                included: Annotated[float, typer.Option(help="Usage included per month, in USD at list price (subscription).")] = 0.0,
                overage_rate: Annotated[Optional[float], typer.Option(help="Subscription: x list price past the included usage; unset: hard quota.")] = None,
                price_multiplier: Annotated[float, typer.Option(help="payg/prepaid: x list price.")] = 1.0,
                spend_limit: Annotated[Optional[float], typer.Option(help="payg: monthly cap in USD.")] = None,
                rpm: Annotated[int, typer.Option(help="Default requests per minute per key.")] = 600,
                tpm: Annotated[int, typer.Option(help="Default tokens per minute per key.")] = 200_000,
                db: DbOpt = None, as_json: JsonOpt = False):
    """Create a billing plan."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.plan_out(crud.create_plan(s, name, kind, monthly_fee, included, overage_rate, price_multiplier,
                                                              spend_limit, rpm, tpm))), as_json, "plan")


@plan_app.command("list")
def plan_list(db: DbOpt = None, as_json: JsonOpt = False):
    from aigc.db import crud
    from aigc.db.models import Plan

    _show(_db_do(db, lambda s: [crud.plan_out(p) for p in crud.list_all(s, Plan)]), as_json, "plans")


@price_app.command("set")
def price_set(model: Annotated[str, typer.Argument(help="Model id, or * for the default price.")],
              version: Annotated[str, typer.Option(help="Model version, or * for any.")] = "*",
              input_per_1k: Annotated[float, typer.Option(help="USD per 1K input tokens.")] = 0.0,
              output_per_1k: Annotated[float, typer.Option(help="USD per 1K output tokens.")] = 0.0,
              per_image: Annotated[float, typer.Option(help="USD per image.")] = 0.0,
              per_second: Annotated[float, typer.Option(help="USD per second of audio/video.")] = 0.0,
              per_1k_train_tokens: Annotated[float, typer.Option(help="USD per 1K tokens trained on by a fine-tuning job of this model.")] = 0.0,
              per_1k_chars: Annotated[float, typer.Option(help="USD per 1K characters spoken (speech).")] = 0.0,
              db: DbOpt = None, as_json: JsonOpt = False):
    """Set the list price of a model (version)."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.price_out(crud.set_price(s, model, version, input_per_1k, output_per_1k, per_image, per_second,
                                                             per_1k_train_tokens, per_1k_chars))),
          as_json, "price")


@price_app.command("list")
def price_list(db: DbOpt = None, as_json: JsonOpt = False):
    from aigc.db import crud
    from aigc.db.models import Price

    _show(_db_do(db, lambda s: [crud.price_out(p) for p in crud.list_all(s, Price)]), as_json, "prices")


@org_app.command("create")
def org_create(name: str, plan: Annotated[Optional[str], typer.Option(help="Plan name.")] = None,
               credits: Annotated[float, typer.Option(help="Initial prepaid credits (USD).")] = 0.0,
               db: DbOpt = None, as_json: JsonOpt = False):
    """Create an organisation (tenant)."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.org_out(s, crud.create_org(s, name, plan, credits))), as_json, "organisation")


@org_app.command("list")
def org_list(db: DbOpt = None, as_json: JsonOpt = False):
    from aigc.db import crud
    from aigc.db.models import Organization

    _show(_db_do(db, lambda s: [crud.org_out(s, o) for o in crud.list_all(s, Organization)]), as_json, "organisations")


@org_app.command("credits")
def org_credits(org: str, amount: Annotated[float, typer.Argument(help="USD to add (negative to remove).")],
                db: DbOpt = None, as_json: JsonOpt = False):
    """Add prepaid credits."""
    from aigc.db import crud

    def work(s):
        o = crud.get_org(s, org)
        crud.add_credits(s, o.id, amount)
        s.refresh(o)
        return crud.org_out(s, o)
    _show(_db_do(db, work), as_json, "organisation")


@org_app.command("plan")
def org_plan(org: str, plan: str, db: DbOpt = None, as_json: JsonOpt = False):
    """Move an organisation to another plan."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.org_out(s, crud.set_org_plan(s, crud.get_org(s, org).id, plan))), as_json, "organisation")


@user_app.command("create")
def user_create(org: str, email: str, role: Annotated[str, typer.Option(help="admin, developer, viewer or reviewer.")] = "developer",
                db: DbOpt = None, as_json: JsonOpt = False):
    """Add a user to an organisation."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.user_out(crud.create_user(s, crud.get_org(s, org).id, email, role))), as_json, "user")


@user_app.command("password")
def user_password(org: str, email: str, db: DbOpt = None, as_json: JsonOpt = False,
                  password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")] = False):
    """Set a user's console password (hashed with scrypt; asked twice unless --password-stdin)."""
    from aigc.db import crud

    password = sys.stdin.readline().rstrip("\n") if password_stdin else typer.prompt("Password", hide_input=True,
                                                                                       confirmation_prompt=True)
    _show(_db_do(db, lambda s: crud.user_out(crud.set_password(s, crud.get_org(s, org).id, email, password))), as_json, "user")


@user_app.command("list")
def user_list(org: str, db: DbOpt = None, as_json: JsonOpt = False):
    from aigc.db import crud
    from aigc.db.models import User

    _show(_db_do(db, lambda s: [crud.user_out(u) for u in crud.list_all(s, User, crud.get_org(s, org).id)]), as_json, "users")


@key_app.command("create")
def key_create(org: str, user: Annotated[str, typer.Argument(help="User e-mail or id.")],
               name: Annotated[str, typer.Option(help="A label for the key.")] = "",
               model: Annotated[Optional[list[str]], typer.Option("--model", help="Allowed model (repeatable; default: all).")] = None,
               rpm: Annotated[Optional[int], typer.Option(help="Requests per minute (default: the plan's).")] = None,
               tpm: Annotated[Optional[int], typer.Option(help="Tokens per minute (default: the plan's).")] = None,
               expires_days: Annotated[Optional[float], typer.Option(help="Expire after this many days.")] = None,
               db: DbOpt = None, as_json: JsonOpt = False):
    """Create an API key. The secret is printed once; only its hash is stored."""
    import datetime as dt

    from aigc.db import crud

    if expires_days is not None and expires_days <= 0:
        raise UserError("--expires-days must be > 0")
    expires = crud.utcnow() + dt.timedelta(days=expires_days) if expires_days else None

    def work(s):
        o = crud.get_org(s, org)
        key, secret = crud.create_key(s, crud.get_user(s, o.id, user), name, model, rpm, tpm, expires)
        return {**crud.key_out(key), "api_key": secret}
    res = _db_do(db, work)
    if as_json:
        _emit_json(res)
    else:
        out.print(f"key {res['id']} ({res['prefix']}...) created; it is shown only now:")
        print(res["api_key"])


@key_app.command("list")
def key_list(org: str, db: DbOpt = None, as_json: JsonOpt = False):
    from aigc.db import crud
    from aigc.db.models import ApiKey

    _show(_db_do(db, lambda s: [crud.key_out(k) for k in crud.list_all(s, ApiKey, crud.get_org(s, org).id)]), as_json, "keys")


@key_app.command("revoke")
def key_revoke(org: str, key_id: int, db: DbOpt = None, as_json: JsonOpt = False):
    """Revoke a key (a running server stops accepting it within a few seconds)."""
    from aigc.db import crud

    _show(_db_do(db, lambda s: crud.key_out(crud.revoke_key(s, crud.get_org(s, org).id, key_id))), as_json, "key")


@usage_app.command("report")
def usage_report(by: Annotated[str, typer.Option(help="Comma-separated grouping: tenant, key, model, day.")] = "tenant,model",
                 start: Annotated[Optional[str], typer.Option(help="First day (YYYY-MM-DD).")] = None,
                 end: Annotated[Optional[str], typer.Option(help="Last day (YYYY-MM-DD).")] = None,
                 org: Annotated[Optional[str], typer.Option(help="Only this organisation.")] = None,
                 db: DbOpt = None, as_json: JsonOpt = False):
    """Requests, units, revenue, compute cost and margin, from the daily rollups."""
    import datetime as dt

    from aigc.db import crud

    def day(v):
        try:
            return dt.date.fromisoformat(v) if v else None
        except ValueError:
            raise UserError(f"not a date (YYYY-MM-DD): {v!r}") from None

    groups = [g.strip() for g in by.split(",") if g.strip()]
    rows = _db_do(db, lambda s: crud.usage_report(s, groups, day(start), day(end), crud.get_org(s, org).id if org else None))
    _show(rows, as_json, "usage")


# ---------------------------------------------------------------- governance: verify, audit, policy, keys, retention

audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
app.add_typer(audit_app, name="audit")
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys for stored prompts and outputs.")
c2pa_app = typer.Typer(no_args_is_help=True, help="C2PA signing credentials.")
admin_app.add_typer(keys_app, name="keys")
admin_app.add_typer(c2pa_app, name="c2pa")


@app.command("verify")
def verify(
    targets: Annotated[Optional[list[str]], typer.Argument(help="Files (PNG, JPEG, WAV, MP3, FLAC, M4A, MP4), text files with --text-file, or texts (after -- if one starts with -); - reads stdin.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", help="Text run whose tokenizer scores the text (repeatable).")] = None,
    org: Annotated[Optional[str], typer.Option(help="Score the text with this organisation's watermark key (default: this machine's CLI key).")] = None,
    text_file: Annotated[bool, typer.Option("--text-file", help="TARGETS are text files to score, not media files.")] = False,
    jsonl: Annotated[Optional[Path], typer.Option(help="Score every text of this JSONL file: a JSON string or {\"text\": ..., \"id\": ...} per line.")] = None,
    threshold: Annotated[float, typer.Option(help="z-score above which text counts as watermarked.")] = 4.0,
    home: Annotated[Optional[Path], typer.Option(help="Data folder whose keys and CA the content was made with (default: $AIGC_HOME or ~/.aigc).")] = None,
    db: DbOpt = None, as_json: JsonOpt = False,
):
    """Report the text watermark z-score, the image and audio watermark payloads (and their generation) and the C2PA state.

    Exit status: 0 when every target is detected (text) or carries a valid signature or watermark (files),
    1 when one is not, 2 on an error. Several targets, or --jsonl, print one result line each."""
    from aigc.govern import records
    from aigc.govern.c2pa import anchors_from_settings

    settings = _settings(db, home=home)
    items = _verify_items(list(targets or []), jsonl, text_file)
    texts = [it for it in items if isinstance(it["content"], str)]
    candidates = _watermark_scorers(settings, model, org, db) if texts else []
    sessions = _existing_db(settings) if len(texts) < len(items) else None
    anchors = anchors_from_settings(settings) if len(texts) < len(items) else ""
    audio_key = _existing_secret(settings.home, "audio-watermark") if len(texts) < len(items) else None
    results = []
    try:
        for it in items:
            if isinstance(it["content"], str):
                report = {"text_watermark": records.verify_text(it["content"], candidates, threshold)}
                ok = bool(report["text_watermark"].get("detected"))
            else:
                if sessions is None:
                    report = records.verify_file(it["content"], anchors, None, None, operator=True, audio_key=audio_key)
                else:
                    with sessions() as s:
                        report = records.verify_file(it["content"], anchors, s, None, operator=True, audio_key=audio_key)
                ok = (report["c2pa"]["state"] in ("Trusted", "Valid") or bool(report.get("image_watermark", {}).get("found"))
                      or bool(report.get("audio_watermark", {}).get("found")))
            results.append((it["label"], report, ok))
    finally:
        if sessions is not None:
            sessions.kw["bind"].dispose()
    if len(results) == 1 and jsonl is None:
        report = results[0][1]
        if as_json:
            _emit_json(report)
        else:
            _print_verdict(report)
    else:
        for label, report, ok in results:
            if as_json:
                print(json.dumps({"target": label, "verdict": ok, **report}, ensure_ascii=False, default=str))
            else:
                out.print(f"{label}: {_one_line_verdict(report)}", markup=False, highlight=False)
    if not all(ok for _, _, ok in results):
        raise typer.Exit(1)


def _verify_items(targets: list[str], jsonl: Path | None, text_file: bool) -> list[dict]:
    """What `aigc verify` checks, read and checked up front so that a bad input fails before any result."""
    items: list[dict] = []
    for target in targets:
        path = Path(target)
        if target == "-":
            items.append({"label": "stdin", "content": sys.stdin.read()})
        elif path.is_file():
            data = path.read_bytes()
            if text_file:
                try:
                    items.append({"label": target, "content": data.decode("utf-8")})
                except UnicodeDecodeError:
                    raise UserError(f"{path} is not UTF-8 text") from None
            elif not data:
                raise UserError(f"{path} is empty")
            else:
                items.append({"label": target, "content": data})
        elif text_file:
            raise UserError(f"file not found: {path}")
        else:
            items.append({"label": f"text {len(items) + 1}", "content": target})
    if jsonl is not None:
        if not jsonl.is_file():
            raise UserError(f"--jsonl: file not found: {jsonl}")
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{jsonl}:{n}: not JSON ({e.msg})") from None
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{jsonl}:{n}: expected a JSON string or an object with a non-empty \"text\"")
            label = str(row.get("id", f"{jsonl.name}:{n}")) if isinstance(row, dict) else f"{jsonl.name}:{n}"
            items.append({"label": label, "content": text})
    if not items:
        raise UserError("nothing to verify: pass files, texts, - (stdin) or --jsonl FILE")
    return items


def _watermark_scorers(settings, model: list[Path] | None, org: str | None, db: str | None) -> list[tuple]:
    """(model id, tokenizer, key) per --model run, with the home's existing text-watermark key."""
    from transformers import AutoTokenizer

    from aigc.govern.crypto import secret
    from aigc.govern.text_watermark import tenant_key

    if not model:
        raise UserError("scoring text needs the model that wrote it: --model RUN")
    wm_secret = secret(settings.home, "text-watermark", create=False)
    tenant = _db_do(db, lambda s: crud_org_id(s, org)) if org else "local"
    cands = []
    for run in model:
        folder = model_folder(run)
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise UserError(f"{run}: no tokenizer found (expected a text run)")
        cands.append((run.name, AutoTokenizer.from_pretrained(str(folder)), tenant_key(wm_secret, tenant)))
    return cands


def _existing_db(settings):
    """Sessions on the configured database, or None where it is an SQLite file that does not exist (verify creates nothing)."""
    url = settings.resolved_database_url()
    if url.startswith("sqlite:///") and not Path(url.split("///", 1)[1]).is_file():
        return None
    from aigc.db.session import open_db

    return open_db(url)


def _one_line_verdict(report: dict) -> str:
    if "text_watermark" in report:
        t = report["text_watermark"]
        if "z" not in t:
            return f"text watermark: {t.get('reason')}"
        return (f"{'DETECTED' if t['detected'] else 'not detected'} (z = {t['z']:.2f}, {t['scored_tokens']} tokens, model {t['model']})"
                + (f"; {t['note']}" if t.get("note") else ""))
    parts = [f"C2PA {report['c2pa']['state']}"]
    for kind in ("image", "audio"):
        w = report.get(f"{kind}_watermark")
        if w is not None:
            parts.append(f"{kind} watermark id {w['watermark_id']}" if w.get("found") else f"no {kind} watermark")
    return "; ".join(parts)


def crud_org_id(s, org: str) -> int:
    from aigc.db import crud

    return crud.get_org(s, org).id


def _open_sessions(db: str | None):
    from aigc.db.session import open_db

    return open_db(_settings(db).resolved_database_url())


def _print_verdict(report: dict) -> None:
    if "c2pa" in report:
        c = report["c2pa"]
        out.print(f"C2PA: {c['state']} - {c['reason']}", markup=False, highlight=False)
        if c.get("manifest"):
            m = c["manifest"]
            out.print(f"  model {m.get('model')} version {m.get('model_version')}; source type {m.get('digital_source_type')}",
                      markup=False, highlight=False)
    for kind in ("image", "audio"):
        if f"{kind}_watermark" not in report:
            continue
        w = report[f"{kind}_watermark"]
        if w.get("found"):
            g = w.get("generation") or {}
            where = f" -> generation {g['generation_id']} (request {g['request_id']}, {g['organization']})" if g.get("owner") else \
                ("" if g.get("known", True) else " (unknown here)")
            out.print(f"{kind} watermark: id {w['watermark_id']} ({w['corrected_bits']} bits corrected){where}", markup=False)
        else:
            out.print(f"{kind} watermark: none ({w.get('reason', '')})", markup=False, highlight=False)
    if "text_watermark" in report:
        t = report["text_watermark"]
        if "z" in t:
            out.print(f"text watermark: {'DETECTED' if t['detected'] else 'not detected'} (z = {t['z']:.2f}, threshold "
                      f"{t['threshold']}, {t['scored_tokens']} tokens scored, model {t['model']})", markup=False)
            if t.get("note"):
                out.print(f"  {t['note']}", markup=False)
        else:
            out.print(f"text watermark: {t.get('reason')}", markup=False)


@audit_app.command("verify")
def audit_verify(expect_head: Annotated[Optional[str], typer.Option(help="A head hash written down earlier: also detects entries removed from the end.")] = None,
                 db: DbOpt = None, as_json: JsonOpt = False):
    """Recompute the whole hash chain; exit status 1 when anything was changed, removed or inserted."""
    from aigc.db import audit

    sessions = _open_sessions(db)
    try:
        with sessions.kw["bind"].connect() as conn:
            rep = audit.verify(conn, expect_head)
    finally:
        sessions.kw["bind"].dispose()
    if as_json:
        _emit_json(rep.to_dict())
    elif rep.ok:
        out.print(f"audit log intact: {rep.entries} entries, head {rep.head}")
    else:
        err.print(f"audit log TAMPERED ({len(rep.problems)} problem(s) in {rep.entries} entries):", markup=False)
        for pr in rep.problems:
            err.print(f"  {pr}", markup=False, highlight=False)
    if not rep.ok:
        raise typer.Exit(1)


@audit_app.command("head")
def audit_head(db: DbOpt = None):
    """Print the newest entry's hash: keep it elsewhere and pass it to `aigc audit verify --expect-head`."""
    from aigc.db import audit

    sessions = _open_sessions(db)
    try:
        with sessions.kw["bind"].connect() as conn:
            print(audit.head(conn))
    finally:
        sessions.kw["bind"].dispose()


@audit_app.command("show")
def audit_show(limit: Annotated[int, typer.Option(help="Newest entries to show.")] = 20,
               kind: Annotated[Optional[str], typer.Option(help="Only this kind (generation, admin.key.create, complaint.decision, ...).")] = None,
               db: DbOpt = None, as_json: JsonOpt = False):
    import json as _json

    from sqlalchemy import select

    from aigc.db.models import AuditEntry

    def work(s):
        q = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(max(1, limit))
        if kind:
            q = q.where(AuditEntry.kind == kind)
        return [{"seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor, "org": e.org_id, "subject": e.subject,
                 "data": _json.loads(e.data) if as_json else e.data[:80], "hash": e.hash[:16]} for e in s.scalars(q)]
    _show(_db_do(db, work), as_json, "audit entries")


@org_app.command("policy")
def org_policy(org: str,
               set_: Annotated[Optional[list[str]], typer.Option("--set", help="Policy setting NAME=VALUE (repeatable): watermark_text, watermark_image, c2pa, png_parameters, store_content, pii, retention_days.")] = None,
               moderation: Annotated[Optional[Path], typer.Option(help="The organisation's moderation rules (YAML file).")] = None,
               default_moderation: Annotated[bool, typer.Option("--default-moderation", help="Go back to the built-in moderation rules.")] = False,
               db: DbOpt = None, as_json: JsonOpt = False):
    """Show or change an organisation's governance policy (a running server picks it up within seconds)."""
    from aigc.db import crud
    from aigc.govern.records import DEFAULT_POLICY, set_policy

    changes = {}
    for pair in set_ or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: write NAME=VALUE")
        k, v = pair.split("=", 1)
        changes[k.strip()] = v.strip()
    rules = None
    if moderation is not None:
        if not moderation.is_file():
            raise UserError(f"moderation policy not found: {moderation}")
        rules = moderation.read_text(encoding="utf-8")
    elif default_moderation:
        rules = ""

    def work(s):
        o = crud.get_org(s, org)
        if changes or rules is not None:
            o = set_policy(s, o.id, changes, rules)
        return {**DEFAULT_POLICY, **(o.policy or {}), "moderation": "custom" if o.moderation else "default"}
    res = _db_do(db, work)
    _show(res, as_json, "policy")


@keys_app.command("rotate")
def keys_rotate(home: Annotated[Optional[Path], typer.Option(help="Data folder (default: $AIGC_HOME or ~/.aigc).")] = None):
    """Add a fresh data key and make it active (old keys stay, so old records still decrypt)."""
    from aigc.govern.crypto import KeyRing

    settings = _settings(home=home)
    kid = KeyRing.load(settings.home, settings.data_keys).rotate()
    out.print(f"active data key is now {kid}; restart the server, then run `aigc admin keys reencrypt` to move old records")


@keys_app.command("reencrypt")
def keys_reencrypt(home: Annotated[Optional[Path], typer.Option(help="Data folder.")] = None, db: DbOpt = None):
    """Re-seal every stored prompt and output under the active key."""
    from aigc.govern import records
    from aigc.govern.crypto import KeyRing

    settings = _settings(home=home)
    ring = KeyRing.load(settings.home, settings.data_keys)
    res = _db_do(db, lambda s: records.reencrypt(s, ring))
    out.print(f"{res['reencrypted_fields']} stored fields now sealed with {res['active_key']}")


@admin_app.command("purge")
def purge(db: DbOpt = None, as_json: JsonOpt = False):
    """Delete stored prompts and outputs older than each organisation's retention_days (hashes and audit stay)."""
    from aigc.govern import records

    res = _db_do(db, lambda s: records.purge(s))
    _show(res, as_json, "purge")


@c2pa_app.command("init")
def c2pa_init(home: Annotated[Optional[Path], typer.Option(help="Data folder.")] = None,
              overwrite: Annotated[bool, typer.Option(help="Replace existing development credentials.")] = False):
    """Create a local development CA chain (root -> intermediate -> signer) for C2PA signing."""
    from aigc.govern.c2pa import create_dev_ca

    folder = _settings(home=home).home / "c2pa"
    paths = create_dev_ca(folder, overwrite=overwrite)
    out.print(f"development C2PA credentials in {folder}: trust anchor {paths['root'].name}, signer chain "
              f"{paths['chain'].name}, key {paths['key'].name}. For production set AIGC_C2PA_CERT and AIGC_C2PA_KEY "
              "(or AIGC_C2PA_SIGNER).", markup=False)


@train_app.command("moderation")
def train_moderation(
    data: Annotated[Optional[Path], typer.Option(help="Labelled JSONL (text, label 0/1, optional split). Default: the built-in bilingual set.")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Classifier file (JSON) to write.")] = Path("moderation-classifier.json"),
    threshold: Annotated[float, typer.Option(help="Probability at which the classifier fires.")] = 0.5,
    device: DeviceOpt = "auto",
):
    """Train the moderation classifier: sentence embeddings (offline all-MiniLM-L6-v2) + logistic regression."""
    threads.configure()
    from aigc import devices
    from aigc.govern import moderation as m

    target = str(devices.resolve(device))

    rows = m.read_labelled(data or BUILTIN_MODERATION)
    train = [r for r in rows if r["split"] != "test"] or rows
    with err.status(f"embedding {len(train)} examples"):
        clf = m.Classifier.train([r["text"] for r in train], [r["label"] for r in train], threshold=threshold, device=target)
    clf.save(out_file)
    test = [r for r in rows if r["split"] == "test"]
    msg = f"wrote {out_file} ({len(train)} training examples)"
    if test:
        pr = m.precision_recall([r["label"] for r in test], [int(x >= threshold) for x in clf.score([r["text"] for r in test])])
        msg += f"; held-out precision {pr['precision']:.3f}, recall {pr['recall']:.3f} on {pr['n']} examples"
    out.print(msg, markup=False)


@eval_app.command("moderation")
def eval_moderation(
    data: Annotated[Optional[Path], typer.Option(help="Labelled JSONL; its test split is used when it has one.")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="Moderation policy YAML (default: the built-in rules).")] = None,
    classifier: Annotated[Optional[Path], typer.Option(help="Also score this classifier file.")] = None,
    as_json: JsonOpt = False,
):
    """Precision and recall of the rules (and a classifier) on a labelled set."""
    threads.configure()
    from aigc.govern import moderation as m

    rows = m.read_labelled(data or BUILTIN_MODERATION)
    test = [r for r in rows if r["split"] == "test"] or rows
    labels = [r["label"] for r in test]
    pol = m.Policy.load(policy) if policy else m.default_policy()
    actions = [pol.check(r["text"], "input").action for r in test]
    report = {"examples": len(test), "rules_block": m.precision_recall(labels, [int(a == "block") for a in actions]),
              "rules_block_or_flag": m.precision_recall(labels, [int(a in ("block", "flag")) for a in actions])}
    if classifier:
        clf = m.Classifier.load(classifier)
        report["classifier"] = m.precision_recall(labels, [int(x >= clf.threshold) for x in clf.score([r["text"] for r in test])])
    if as_json:
        _emit_json(report)
        return
    harmful = sum(labels)
    source = str(data) if data else "the built-in bilingual labelled set"
    out.print(f"moderation on {len(test)} labelled examples of {source} ({harmful} harmful, {len(test) - harmful} harmless)"
              f"{'; its test split' if any(r['split'] == 'test' for r in rows) else ''}", markup=False, highlight=False)
    out.print("  precision: of the texts a row stops, the share that are harmful; recall: of the harmful texts, "
              "the share it stops", markup=False, highlight=False)
    rows_shown = (("rules_block", "rules, blocks only"), ("rules_block_or_flag", "rules, blocks or flags"), ("classifier", "classifier"))
    for name, title in rows_shown:
        if name not in report:
            continue
        r = report[name]
        stopped = r["tp"] + r["fp"]
        if stopped == 0:
            detail = (f"stopped nothing: none of these texts contains a phrase of a rule that {'blocks' if name == 'rules_block' else 'acts'}; "
                      f"recall 0.000 ({harmful} harmful texts through)")
        else:
            detail = f"stopped {stopped}: precision {r['precision']:.3f}  recall {r['recall']:.3f}  f1 {r['f1']:.3f}"
        out.print(f"  {title + ':':<24}{detail}", markup=False, highlight=False)


BUILTIN_MODERATION = Path(__file__).resolve().parent / "data" / "builtin" / "moderation-labelled.jsonl"


def _usage_error_types() -> tuple[type, ...]:
    """Usage-error classes of the installed typer and click: typer >= 0.29 raises its own vendored copy of click's."""
    import click

    types: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        types.append(VendoredClickException)
    except ImportError:  # an older typer raises click's own
        pass
    return tuple(types)


def _usage_message(e) -> str:
    """One line for a usage mistake: what was wrong and what is allowed."""
    ctx = getattr(e, "ctx", None)
    where = f" ({ctx.command_path})" if ctx is not None else ""
    name = type(e).__name__
    if name == "NoSuchOption" and ctx is not None:
        allowed = sorted({o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("--")} | {"--help"})
        hint = f"; did you mean {', '.join(sorted(e.possibilities))}?" if getattr(e, "possibilities", None) else ""
        return f"no such option {e.option_name}{where}{hint}; allowed: {' '.join(allowed)}"
    message = e.format_message().strip().splitlines()
    text = " ".join(line.strip() for line in message if line.strip()).rstrip(".")
    if name == "UsageError" and ctx is not None and hasattr(ctx.command, "list_commands") and "No such command" in text:
        return f"{text}{where}; commands: {', '.join(ctx.command.list_commands(ctx))}"
    return f"{text}{where}"


def _log_level() -> str:
    from aigc.settings import Settings

    try:
        return Settings().log_level.upper()
    except Exception:  # a bad AIGC_* setting: the command reports it in one line
        return "WARNING"


def main() -> None:
    logging.basicConfig(level=_log_level(), format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    usage_errors = _usage_error_types()
    from pydantic import ValidationError
    try:
        rc = app(prog_name="aigc", standalone_mode=False)  # typer.Exit(code) comes back as a return value in this mode
        if rc == 130:
            err.print("interrupted")
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except ValidationError as e:  # a bad AIGC_* setting
        problems = "; ".join(f"AIGC_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
        err.print(f"error: bad setting: {problems}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit:
        raise
    except usage_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `aigc` or `aigc train` alone: the help is what was asked for
            print(e.format_message())
            sys.exit(0)
        err.print(f"error: {_usage_message(e)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)


if __name__ == "__main__":
    main()
