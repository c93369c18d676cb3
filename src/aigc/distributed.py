"""Training on several processes with torch's own engine: torchrun starts them, DDP keeps them in step.

A job is launched either by ``torchrun --nproc-per-node N -m aigc train ...`` or by ``aigc train ... --nproc N``
(``launch`` below), which checks the request and re-executes the same command under torchrun, as LLaMA-Factory
does. Each process (a rank) then finds its place in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) and joins the process group: gloo on CPUs, NCCL on CUDA, with a timeout on every collective so
a rank that died stops the others instead of leaving them waiting for ever.

How the loops use it (train/lm.py, chat.py, image.py, music.py):

- ``train.batch_size`` is the **global** batch. Every rank draws the whole batch of a step as a function of
  (seed, step) exactly as one process would, and keeps its own slice (``shard``): the step's data is the same
  whatever the world size, a resumed run is exact, and a 2-process run logs the losses of a 1-process run;
- gradients are averaged by ``DistributedDataParallel``; losses and evaluation scores by ``mean``/``sums``;
- the clock and Ctrl-C are agreed on (``agree``) after every step, so the learning-rate schedule of a time
  budget and the decision to stop are the same on every rank;
- only rank 0 (``World.main``) writes the run directory: metrics, checkpoints, the model, samples;
- a single process (no torchrun) is world size 1 and every function here is a no-op.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch

from aigc.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class World:
    """This process' place in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


_current = World()


def from_env() -> World:
    """The world torchrun describes in the environment (world size 1 when it did not start this process)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise UserError(f"bad torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): {exc}") from None


def current() -> World:
    """The world this process joined (``start``), world size 1 before."""
    return _current


def start(timeout_s: float = 0.0) -> World:
    """Join the process group torchrun set up (once; a no-op for a single process). gloo is always there (CPU
    tensors, and the small control messages of ``agree``); CUDA tensors go through NCCL when the GPU build has it."""
    global _current
    world = from_env()
    if world.active and not torch.distributed.is_initialized():
        timeout = dt.timedelta(seconds=timeout_s or float(os.environ.get("AIGC_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(backend, timeout=timeout)
        log.info("rank %d of %d joined (%s)", world.rank, world.world_size, backend)
    _current = world
    return world


def stop() -> None:
    """Leave the process group (at the end of a job)."""
    global _current
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = World()


def place(device: torch.device, world: World) -> torch.device:
    """A rank's own GPU (``cuda:LOCAL_RANK``) when the job runs on CUDA; the device as given otherwise."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return device


def check_batch(batch_size: int, world: World, what: str = "train.batch_size") -> None:
    if batch_size % world.world_size:
        raise UserError(f"{what}={batch_size} (the global batch) does not divide among {world.world_size} processes; "
                        f"use a multiple of {world.world_size}")


def check_resume(state: dict, world: World) -> None:
    """A run resumes on as many processes as it was trained on: the order of its floating-point sums, and so its
    exact losses, depend on it."""
    saved = state.get("world_size", 1)
    if saved != world.world_size:
        raise UserError(f"this run was trained on {saved} process(es) and is resumed on {world.world_size}; "
                        f"resume it with --nproc {saved}" if saved > 1 else
                        f"this run was trained in one process and is resumed on {world.world_size}; resume it without --nproc")


def shard(items, world: World):
    """This rank's contiguous slice of a global batch (a list or a tensor whose first dimension is the batch)."""
    if not world.active:
        return items
    n = len(items) // world.world_size
    return items[world.rank * n : (world.rank + 1) * n]


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module that trains: ``DistributedDataParallel`` around ``model`` in a distributed job, ``model`` alone
    otherwise. Its forward must be what computes the loss: DDP averages the gradients of what ran through it."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp2(root: torch.nn.Module, layers, world: World) -> torch.nn.Module:
    """Shard ``root`` with FSDP2 (``fully_shard``): each of ``layers`` (the decoder blocks) is its own unit, gathered
    just before it runs and freed after, and ``root`` holds the rest (embeddings, final norm, output layer).
    Parameters, gradients and optimizer state are split across the ranks: for models that do not fit one GPU.
    Compute precision stays with the loop's autocast."""
    if not world.active:
        raise UserError("train.fsdp shards a model across processes: launch with --nproc N (N >= 2) or torchrun")
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    return root


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(root: torch.nn.Module, prefix: str = "", trainable_only: bool = False) -> dict:
    """The whole (unsharded) state dict of an FSDP2 ``root`` on CPU tensors, keys without ``prefix``: on rank 0 (the
    others get {}). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(root, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only))
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def load_full_state(root: torch.nn.Module, state: dict, prefix: str = "") -> None:
    """Load a whole state dict (every rank holds it, read from the checkpoint) into an FSDP2 ``root``: each rank
    keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(root, {prefix + k: v for k, v in state.items()}, options=_options(strict=False))


def full_optimizer_state(root: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state on rank 0 (CPU tensors), {} elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(root: torch.nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=_options())


def sums(values: list[float]) -> list[float]:
    """Each value summed over the ranks (the values themselves for a single process). Python numbers, sent through
    gloo on the CPU in float64: a few per step, never a GPU tensor."""
    if not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def mean(values: list[float]) -> list[float]:
    """Each value averaged over the ranks."""
    world = current()
    return [v / world.world_size for v in sums(values)]


def agree(elapsed: float, interrupted: bool) -> tuple[float, bool]:
    """(the slowest rank's clock, whether any rank was interrupted), the same on every rank: what a time budget and
    Ctrl-C decide must be decided once for all."""
    if not torch.distributed.is_initialized():
        return elapsed, interrupted
    t = torch.tensor([elapsed, float(interrupted)], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0]), bool(t[1])


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only (preparing the run directory), the others waiting; a UserError it raises is raised
    on every rank, with the same message, so the job stops with one clear line instead of a timeout."""
    world = current()
    if not world.active:
        return fn(*args, **kwargs)
    message = ""
    if world.main:
        try:
            fn(*args, **kwargs)
        except UserError as exc:
            message = str(exc) or "failed"
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0])
    return None


# ---------------------------------------------------------------- the launcher

@dataclass
class Launch:
    """``aigc train ... --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]``."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    oversubscribe: bool = False

    @property
    def wanted(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


LAUNCH_FLAGS = {"--nproc": True, "--nnodes": True, "--node-rank": True, "--master-addr": True, "--master-port": True,
                "--oversubscribe": False}  # flag: whether it takes a value


def check_launch(launch: Launch, device: torch.device) -> None:
    """The launcher's own checks, before anything starts: one clear line each."""
    if launch.nproc < 1 or launch.nnodes < 1:
        raise UserError("--nproc and --nnodes must be >= 1")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise UserError(f"--node-rank {launch.node_rank}: expected 0 to {launch.nnodes - 1} (--nnodes {launch.nnodes})")
    if launch.nnodes > 1 and not launch.master_port:
        raise UserError("--nnodes > 1 needs --master-addr (the host of node 0) and --master-port (the same on every node)")
    if os.environ.get("WORLD_SIZE"):
        raise UserError("--nproc inside a torchrun job: torchrun already started the processes; drop --nproc")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if launch.nproc > count:
            raise UserError(f"--nproc {launch.nproc}: this machine has {count} CUDA device(s); one process per GPU")
    elif device.type == "mps":
        raise UserError("--nproc: several processes on Apple's MPS are not supported; use one process")
    else:
        from aigc import threads

        cores = len(threads.usable_cores())
        if launch.nproc > cores and not launch.oversubscribe:
            raise UserError(f"--nproc {launch.nproc} on {cores} CPU core(s): the processes would fight for the cores and "
                            f"train slower than one; use --nproc {cores} or less (or --oversubscribe to do it anyway)")


def strip_flag(argv: list[str], names: tuple[str, ...], takes_value: bool = True) -> list[str]:
    """``argv`` without the options ``names`` (as ``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in names:
            skip = takes_value and "=" not in arg
            continue
        out.append(arg)
    return out


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without the launcher's own flags (what each rank runs)."""
    for name, takes_value in LAUNCH_FLAGS.items():
        argv = strip_flag(argv, (name,), takes_value)
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(launch: Launch, argv: list[str]) -> list[str]:
    port = launch.master_port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}", f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}", f"--master-addr={launch.master_addr}", f"--master-port={port}",
            "--max-restarts=0", "-m", "aigc", *strip_launch_flags(argv)]


def launch(launch: Launch, argv: list[str]) -> int:
    """Run ``aigc ARGV`` under torchrun and wait; the exit status of the job (0 when every rank finished)."""
    cmd = torchrun_command(launch, argv)
    log.info("launching %d process(es) on this node: %s", launch.nproc, " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, env=env).returncode
