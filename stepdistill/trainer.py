"""The one training loop under every recipe, on ``accelerate``; it knows nothing of any method's math.

One *training step* is one generator update, preceded by ``method.critic_steps_per_generator_step``
critic updates (the two time-scale update rule of DMD2; 1 for methods without a critic):

    for step in 1..max_train_steps:
        repeat k times:  critic_loss(batch)    → critic optimiser (fake score + discriminator)
        generator_loss(batch)                  → generator optimiser (student), EMA update,
                                                 method.after_generator_update() if it has one
        every validation_steps: validate(step) on the weights that would be exported (EMA if kept)
        every checkpointing_steps: atomic checkpoint

A run may be split into *stages* of ``stage_steps`` steps (progressive distillation: each stage's
student becomes the next stage's teacher). Before the first step of stage k > 0 the loop calls
``end_stage(k − 1)`` (the recipe exports that stage's student) and ``method.begin_stage(k)`` (the hand-over),
and gives every optimiser a fresh state and learning-rate schedule. The stage index is saved with
each checkpoint; a checkpoint written at a stage's last step resumes into the same hand-over as an
uninterrupted run.

On several processes every network is laid out by torch's FSDP2 engine (:mod:`stepdistill.sharding`):
replicated (data parallel: gradients averaged in backward) or sharded (weights, gradients and AdamW
state split over the processes); checkpoints are then distributed checkpoints. Each process holds
its rows of the global batch and draws their noise as one process would (:mod:`stepdistill.draws`),
so P processes at batch B train like one at batch P·B.

Each update accumulates ``gradient_accumulation_steps`` micro-batches, clips the gradient norm,
steps its optimiser's learning-rate schedule (diffusers' ``get_scheduler``: constant, linear, cosine, ...),
and is skipped (and counted) if its loss is not finite; ``max_consecutive_skips`` skips in a row
stop the run with :class:`DivergedError` (checkpoints already written stay intact). Ctrl-C stops the
run at the end of the current step, writes a checkpoint when checkpointing is on, and raises
:class:`Interrupted`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, is_tensorboard_available, set_seed
from diffusers.optimization import get_scheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from stepdistill import checkpoints, draws, sharding
from stepdistill.checkpoints import EMA_WEIGHTS, METHOD_STATE, TRAINER_STATE
from stepdistill.config import ConfigError
from stepdistill.ema import EMA
from stepdistill.methods.base import Batch, Losses, Method

logger = get_logger(__name__)


class DivergedError(RuntimeError):
    """Raised when updates keep producing non-finite losses: the run has diverged."""


class Interrupted(RuntimeError):
    """The run stopped on Ctrl-C (SIGINT) at the end of step ``step``; ``checkpoint`` holds it, or is
    ``None`` when checkpointing is off; ``is_main_process`` tells which process should say so."""

    def __init__(self, step: int, checkpoint: Path | None, is_main_process: bool = True) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.is_main_process = step, checkpoint, is_main_process


@contextmanager
def stop_requests(announce: bool = True) -> Iterator[threading.Event]:
    """While open, the first Ctrl-C (SIGINT) only sets the returned event, for the loop to stop at the
    end of its update (saying so when ``announce``); a second one interrupts at once, as Python does by
    default. Outside the main thread (where signals cannot be handled) the event is never set."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.getsignal(signal.SIGINT)

    def request_stop(signum, frame) -> None:
        requested.set()
        signal.signal(signal.SIGINT, previous)
        if announce:
            print("\nstopping at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainerConfig:
    """The loop's settings; recipes embed these in their own config."""

    output_dir: str
    max_train_steps: int
    learning_rate: float
    critic_learning_rate: float
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    max_grad_norm: float = 10.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # None: accelerate's own setting
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0
    max_consecutive_skips: int = 10
    checkpointing_steps: int = 0
    validation_steps: int = 0
    stage_steps: int = 0  # steps per stage (0: the run is one stage)
    layout: str = "auto"  # on several processes: replicate (data parallel), shard (FSDP), auto: shard when
    # accelerate is configured for FSDP, else replicate (see stepdistill.sharding)
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    seed: int = 0


def peak_memory_bytes(device: torch.device) -> int:
    """The process's peak memory since it started or since :func:`reset_peak_memory`:
    ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set size (Linux's VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: the peak since the process started (bytes on macOS, KiB elsewhere)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Measure peak memory afresh from now (CUDA's peak statistics; on Linux, the RSS high-water mark);
    ``False`` where the platform cannot (the peak then counts from the process's start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Progress:
    """The counters a resumed run needs (saved as JSON in every checkpoint)."""

    def __init__(self) -> None:
        self.step = 0
        self.stage = 0  # the stage the last step belonged to
        self.skipped_updates = 0
        self.consecutive_skips = {"generator": 0, "critic": 0}  # non-finite updates in a row, per optimiser
        self.seconds = 0.0  # training time, without validation and checkpointing, summed over resumes

    def state_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "skipped_updates": self.skipped_updates,
                "consecutive_skips": self.consecutive_skips, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_updates, self.seconds = state["step"], state["skipped_updates"], state["seconds"]
        self.stage = state.get("stage", 0)  # checkpoints of single-stage runs written before stages existed
        self.consecutive_skips = state["consecutive_skips"]


FP16_ON_CPU = "--mixed_precision fp16 needs a CUDA GPU (on the CPU accelerate runs fp32 instead); use bf16 or no"


def make_accelerator(
    mixed_precision: str | None, report_to: str, output_dir: str | Path, logging_dir: str | Path = "logs",
) -> Accelerator:
    """The run's ``Accelerator``; ``mixed_precision`` ``None`` leaves it to accelerate's config or
    launcher, and fp16 is refused on the CPU, where accelerate would silently run fp32. ``report_to``
    names an accelerate tracker, ``none``, or ``auto`` (tensorboard when it is installed), which logs
    under ``logging_dir`` (relative to ``output_dir``); ``train_log.jsonl`` is written either way.
    Launched as several processes on a machine without CUDA, they join one gloo group (accelerate alone
    would run each as an independent single-process job)."""
    if report_to == "auto":
        report_to = "tensorboard" if is_tensorboard_available() else "none"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision, log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir, logging_dir))),
        cpu=world_size > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo, not N lone runs
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(FP16_ON_CPU)
    if accelerator.num_processes != world_size:
        raise ConfigError(
            f"launched as {world_size} processes but accelerate set up {accelerator.num_processes}; "
            "launch with `accelerate launch --num_processes N` (add --cpu on a machine without GPUs)"
        )
    return accelerator


def require_supported_engine(accelerator: Accelerator) -> None:
    """Refuse distributed engines the trainer does not drive: it runs FSDP2 itself (accelerate's FSDP
    configuration only selects the sharded layout), not DeepSpeed, Megatron-LM or XLA."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ConfigError(
            f"accelerate is configured for {accelerator.distributed_type.value}, which stepdistill does not drive; "
            "use multi-process data parallelism or FSDP (accelerate config), or --parallelism fsdp"
        )
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes == 1:
        raise ConfigError("accelerate is configured for FSDP on one process: sharding needs several "
                          "(accelerate launch --num_processes N), or launch one process without the FSDP config")
    if accelerator.num_processes > 1 and accelerator.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16 on several processes: the FSDP2 engine does not scale fp16 "
                          "losses here; use bf16")


def broadcast_from_main(module: nn.Module) -> None:
    """Give every process the main process's weights and buffers (before laying a network out, so that
    replicas and shards start from one network whatever each process's initialisation drew)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


@contextmanager
def frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """While open, ``parameters`` take no gradient; their ``requires_grad`` flags come back after."""
    trainable = [param.requires_grad for param in parameters]
    for param in parameters:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(parameters, trainable):
            param.requires_grad_(flag)


def set_cpu_threads(accelerator: Accelerator, num_threads: int = 0) -> None:
    """On CPU, give torch ``num_threads`` threads (0: the machine's cores shared among the processes).

    ``accelerate launch`` sets OMP_NUM_THREADS=1 when it is not configured, which halves CPU speed
    on a 2-core machine; this puts the choice back with the run's config.
    """
    if accelerator.device.type == "cpu":
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))


class Trainer:
    """Drive ``method`` over ``next_batch()`` with a generator optimiser and a critic optimiser.

    ``frozen_modules`` (a frozen teacher) take no update; on several processes they are laid out
    with the trained ones, as are a method's own ``frozen_networks``.

    A ``next_batch`` with ``state_dict()`` / ``load_state_dict()`` (streamed data) has its position
    kept in every checkpoint and restored on resume; a plain function draws from torch's generator,
    whose state accelerate keeps."""

    def __init__(
        self,
        cfg: TrainerConfig,
        method: Method,
        generator_modules: list[nn.Module],
        generator_parameters: list[nn.Parameter],
        critic_modules: list[nn.Module],
        critic_parameters: list[nn.Parameter],
        next_batch: Callable[[], Batch],
        accelerator: Accelerator | None = None,
        validate: Callable[[int], dict[str, float]] | None = None,
        end_stage: Callable[[int], None] | None = None,
        frozen_modules: Iterable[nn.Module] = (),
    ) -> None:
        self.cfg = cfg
        self.method = method
        self.next_batch = next_batch
        self.validate = validate
        self.end_stage = end_stage
        if cfg.stage_steps and not hasattr(method, "begin_stage"):
            raise ValueError(f"stage_steps needs a method with stages (begin_stage); {type(method).__name__} has none")
        if cfg.stage_steps and cfg.ema_decay > 0:
            raise ValueError("an EMA of the student is not kept across stages: each stage hands the student as it is "
                             "to the next (ema_decay must be 0 with stage_steps)")
        self.accelerator = accelerator or make_accelerator(cfg.mixed_precision, "none", cfg.output_dir)
        require_supported_engine(self.accelerator)
        modules = list({id(m): m for m in generator_modules + critic_modules}.values())
        self.modules = modules
        self.sharding = None
        if self.accelerator.num_processes > 1:
            if hasattr(type(method), "frozen_networks"):  # (getattr's default would hide a failing property)
                frozen_modules = [*frozen_modules, *method.frozen_networks]
            generator_parameters, critic_parameters = self._lay_out(
                modules, frozen_modules, (generator_parameters, critic_parameters))
        # every process seeded alike draws the global batch's numbers and keeps its rows (stepdistill.draws)
        draws.split_over(self.accelerator.process_index, self.accelerator.num_processes)
        set_seed(cfg.seed)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.generator_optimizer = torch.optim.AdamW(
            generator_parameters, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay
        )
        self.critic_optimizer = (
            torch.optim.AdamW(critic_parameters, lr=cfg.critic_learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay)
            if critic_parameters else None
        )
        if self.sharding is None:  # one process: accelerate's own bookkeeping of modules and optimisers
            optimizers = [o for o in (self.generator_optimizer, self.critic_optimizer) if o]
            prepared = self.accelerator.prepare(*modules, *optimizers)
            prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
            self.generator_optimizer = prepared[len(modules)]
            if self.critic_optimizer is not None:
                self.critic_optimizer = prepared[len(modules) + 1]
        self.generator_parameters, self.critic_parameters = generator_parameters, critic_parameters
        self.lr_schedulers = self._schedules()
        self.ema = EMA(generator_parameters, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.progress = Progress()
        self.log_path = Path(cfg.output_dir) / "train_log.jsonl"
        self.setup_peak_memory, self.training_peak_measured = 0, False  # fit() measures them at the first step

    def _lay_out(
        self, trained: list[nn.Module], frozen_modules: Iterable[nn.Module],
        parameter_lists: tuple[list[nn.Parameter], ...],
    ) -> list[list[nn.Parameter]]:
        """Lay every network over the processes (``cfg.layout``, :mod:`stepdistill.sharding`), frozen
        ones too (a teacher, a method's own copies), each from the main process's weights; wrapping
        replaces parameters, so ``parameter_lists`` are returned re-read by name."""
        param_dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else None  # fp16: refused
        layout = sharding.resolve_layout(self.cfg.layout, self.accelerator.distributed_type == DistributedType.FSDP)
        self.sharding = sharding.Sharding.over_processes(layout, self.accelerator.device, param_dtype)
        networks = list({id(m): m for m in [*trained, *frozen_modules]}.values())
        where = {id(p): (i, name) for i, network in enumerate(networks) for name, p in network.named_parameters()}
        missing = [p for params in parameter_lists for p in params if id(p) not in where]
        if missing:
            raise ValueError(f"{len(missing)} trained parameters belong to none of the trainer's modules")
        places = [[where[id(p)] for p in params] for params in parameter_lists]
        for network in networks:
            broadcast_from_main(network)
            self.sharding.wrap(network)
        return [[networks[i].get_parameter(name) for i, name in place] for place in places]

    def _schedules(self) -> dict:
        """A learning-rate schedule per optimiser over one stage's updates (the whole run's without stages)."""
        steps = self.cfg.stage_steps or self.cfg.max_train_steps
        critic_updates = steps * getattr(self.method, "critic_steps_per_generator_step", 1)
        return {
            role: get_scheduler(self.cfg.lr_scheduler, optimizer, num_warmup_steps=self.cfg.lr_warmup_steps,
                                num_training_steps=updates)
            for role, optimizer, updates in (("generator", self.generator_optimizer, steps),
                                             ("critic", self.critic_optimizer, critic_updates))
            if optimizer is not None
        }

    def _begin_stage(self, stage: int) -> None:
        """Stage ``stage − 1`` is over: let the recipe keep its student, hand it over (``method.begin_stage``)
        and restart every optimiser's moments and learning-rate schedule."""
        if self.end_stage is not None and (self.sharding is not None or self.accelerator.is_main_process):
            self.end_stage(self.progress.stage)  # laid-out networks are gathered by every process together
        self.accelerator.wait_for_everyone()
        self.method.begin_stage(stage)
        for optimizer in (self.generator_optimizer, self.critic_optimizer):
            if optimizer is not None:
                optimizer.state.clear()
        self.lr_schedulers = self._schedules()
        self.progress.stage = stage
        logger.info(f"stage {stage} begins at step {self.progress.step + 1}", main_process_only=True)

    # -- one update -------------------------------------------------------------------------
    def _update(self, role: str, loss_fn: Callable[[Batch], Losses], optimizer, parameters) -> Losses | None:
        """Accumulate gradients over micro-batches, clip, step; ``None`` if the loss was not finite.
        The other role's weights are frozen meanwhile: a student loss that reads the critic (a GAN
        term) computes no gradient for it, and a critic loss none for the student."""
        optimizer.zero_grad(set_to_none=True)
        totals: Losses = {}
        others = self.critic_parameters if role == "generator" else self.generator_parameters
        for _ in range(self.cfg.gradient_accumulation_steps):
            with frozen(others):
                with self._autocast():
                    losses = loss_fn(self.next_batch())
                if not self._finite_everywhere(losses["loss"]):
                    optimizer.zero_grad(set_to_none=True)
                    self._skip_update(role)
                    return None
                self.accelerator.backward(losses["loss"] / self.cfg.gradient_accumulation_steps)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / self.cfg.gradient_accumulation_steps
        if self.cfg.max_grad_norm > 0:
            if self.sharding is None:
                self.accelerator.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
            else:  # the norm over every process's shards (the engine already averaged the gradients)
                torch.nn.utils.clip_grad_norm_(parameters, self.cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers[role].step()
        self.progress.consecutive_skips[role] = 0
        return totals

    def _autocast(self):
        """accelerate's autocast, except where the engine already computes in bf16/fp16 (sharded weights
        gathered in that dtype, each unit casting its inputs): autocast would put some layers (group
        norm) back in fp32 beside low-precision weights."""
        if self.sharding is not None and self.sharding.param_dtype is not None:
            return nullcontext()
        return self.accelerator.autocast()

    def _skip_update(self, role: str) -> None:
        """Count a skipped update; stop the run once one optimiser skips ``max_consecutive_skips`` in a row."""
        self.progress.skipped_updates += 1
        self.progress.consecutive_skips[role] += 1
        step = self.progress.step + 1  # the step being computed, numbered as in train_log.jsonl
        logger.warning(f"non-finite {role} loss at step {step}; update skipped", main_process_only=True)
        if self.progress.consecutive_skips[role] >= self.cfg.max_consecutive_skips:
            saved = checkpoints.list_checkpoints(self.cfg.output_dir)
            raise DivergedError(
                f"{self.progress.consecutive_skips[role]} {role} updates in a row had a non-finite loss (step {step}): "
                "the run has diverged; the last good checkpoint is "
                + (str(saved[-1]) if saved else "none (no checkpoint was saved)")
            )

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (all skip an update together, or none does)."""
        finite = torch.isfinite(loss.detach()).reshape(1).float()
        return bool(self.accelerator.gather(finite).min() > 0)

    def _anywhere(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (all stop together)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device)).max() > 0)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (a temporary folder renamed when complete)."""
        final = Path(self.cfg.output_dir) / f"checkpoint-{self.progress.step}"
        partial = final.with_name(final.name + ".partial")
        if self.accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # left by a crash mid-save
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.sharding is not None:  # weights, optimisers, EMA and method state: each process its shards
            sharding.save(partial / sharding.SHARDED_STATE, *self._distributed_state())
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state before the rename
        if self.accelerator.is_main_process:  # our own state, as JSON and safetensors (nothing pickled)
            schedulers = {role: scheduler.state_dict() for role, scheduler in self.lr_schedulers.items()}
            state = {"progress": self.progress.state_dict(), "lr_schedulers": schedulers}
            if hasattr(self.next_batch, "state_dict"):  # streamed data: where it is read up to
                state["data"] = self.next_batch.state_dict()
            (partial / TRAINER_STATE).write_text(json.dumps(state))
            if self.ema is not None and self.sharding is None:
                self.ema.save(partial / EMA_WEIGHTS)
            method_state = self.method.state_dict() if hasattr(self.method, "state_dict") else {}
            if method_state and self.sharding is None:
                save_file({name: tensor.detach().contiguous().cpu() for name, tensor in method_state.items()},
                          str(partial / METHOD_STATE))
            checkpoints.write_manifest(partial, self.progress.step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            checkpoints.prune(self.cfg.output_dir, self.cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return final

    def _distributed_state(self) -> tuple[dict, dict, dict]:
        """What a distributed checkpoint holds: the trained modules, the optimisers, and the EMA's and
        the method's tensors (see :func:`sharding.save`)."""
        optimizers = {"generator": self.generator_optimizer}
        if self.critic_optimizer is not None:
            optimizers["critic"] = self.critic_optimizer
        tensors = {}
        if self.ema is not None:
            tensors["ema"] = {str(i): shadow for i, shadow in enumerate(self.ema.shadow)}
        if hasattr(self.method, "state_dict"):
            tensors["method"] = self.method.state_dict()
        return {str(i): module for i, module in enumerate(self.modules)}, optimizers, tensors

    def _log(self, record: dict) -> None:
        """Append to ``train_log.jsonl`` and send to accelerate's trackers (if any were initialised)."""
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the checkpoint (a crashed run logged them; they will be redone)."""
        if self.accelerator.is_main_process and self.log_path.is_file():
            lines = self.log_path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= self.progress.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def run_validation(self) -> dict[str, float]:
        """``validate(step)`` on the EMA weights when an EMA is kept; on the main process, or on every
        process when the networks are laid out over them (each forward then gathers weights from all);
        the main process's scores are returned."""
        if self.validate is None or not (self.sharding is not None or self.accelerator.is_main_process):
            return {}
        with self.ema.swapped_in() if self.ema is not None else nullcontext(), torch.no_grad():
            scores = self.validate(self.progress.step)
        return scores if self.accelerator.is_main_process else {}

    def checkpoint_bytes(self) -> int:
        """An estimate of one checkpoint's size: every prepared module's weights plus AdamW's two moments."""
        weights = sum(t.numel() * t.element_size() for m in self.modules for t in m.state_dict().values())
        moments = sum(2 * 4 * p.numel() for p in self.generator_parameters + self.critic_parameters)
        ema = sum(4 * p.numel() for p in self.generator_parameters) if self.ema is not None else 0
        return weights + moments + ema

    def resume(self, request: str) -> None:
        """Load the checkpoint ``request`` names (see :func:`checkpoints.find_checkpoint`): weights,
        optimisers, RNG states, progress, schedules, EMA, the method's own state; ``latest`` before any
        checkpoint starts afresh."""
        checkpoint = checkpoints.find_checkpoint(self.cfg.output_dir, request)
        if checkpoint is None:
            logger.info(f"no checkpoint in {self.cfg.output_dir} yet: starting a new run", main_process_only=True)
            return
        try:
            self.accelerator.load_state(str(checkpoint))
            if self.sharding is not None:
                modules, optimizers, tensors = self._distributed_state()
                sharding.load(checkpoint / sharding.SHARDED_STATE, modules, optimizers, tensors)
        except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as error:  # other networks, or damage
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise checkpoints.CheckpointError(
                f"cannot load {checkpoint} ({first_line}): it was written by a run with other networks or flags "
                "(resume with the flags in the run's config.json), or its files are damaged (give the checkpoint "
                "before it)") from None
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        self.progress.load_state_dict(state["progress"])
        for role, scheduler in self.lr_schedulers.items():
            scheduler.load_state_dict(state["lr_schedulers"][role])
        if hasattr(self.next_batch, "load_state_dict"):
            if "data" not in state:
                raise checkpoints.CheckpointError(f"{checkpoint} holds no data position (written before streamed data "
                                                  "was resumable): start the run afresh")
            try:
                self.next_batch.load_state_dict(state["data"])
            except ValueError as error:
                raise checkpoints.CheckpointError(f"{checkpoint}: {error}; resume with the run's flags") from None
        if self.sharding is not None:  # the EMA was read in place; the method takes its state back
            if "method" in tensors:
                self.method.load_state_dict(tensors["method"])
        elif self.ema is not None:
            try:
                self.ema.load(checkpoint / EMA_WEIGHTS)
            except ValueError as error:
                raise checkpoints.CheckpointError(str(error)) from None
        if hasattr(self.method, "load_state_dict") and self.sharding is None:
            saved = checkpoint / METHOD_STATE
            try:
                self.method.load_state_dict(load_file(str(saved)) if saved.is_file() else {})
            except (RuntimeError, KeyError) as error:
                raise checkpoints.CheckpointError(f"{checkpoint} does not hold this method's state "
                                                  f"({str(error).splitlines()[0]})") from None
        logger.info(f"resumed from {checkpoint} at step {self.progress.step}", main_process_only=True)
        self._truncate_log()

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> Progress:
        cfg = self.cfg
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        if cfg.checkpointing_steps:
            checkpoints.require_disk_space(cfg.output_dir, self.checkpoint_bytes())
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        critic_steps = getattr(self.method, "critic_steps_per_generator_step", 1) if self.critic_optimizer else 0
        self.setup_peak_memory = peak_memory_bytes(self.accelerator.device)  # loading and laying out the networks
        self.training_peak_measured = reset_peak_memory(self.accelerator.device)
        bar = tqdm(
            total=cfg.max_train_steps, initial=self.progress.step, desc="distilling",
            disable=not self.accelerator.is_local_main_process,
        )
        with stop_requests(announce=self.accelerator.is_main_process) as stop:
            while self.progress.step < cfg.max_train_steps:
                checkpoint = self._step(critic_steps, bar)
                if self.progress.step < cfg.max_train_steps and self._anywhere(stop.is_set()):
                    bar.close()
                    if cfg.checkpointing_steps and checkpoint is None:
                        checkpoint = self.save_checkpoint()
                    self.accelerator.end_training()  # trackers flush what they hold
                    raise Interrupted(self.progress.step, checkpoint, self.accelerator.is_main_process)
        bar.close()
        self.accelerator.wait_for_everyone()
        return self.progress

    def _step(self, critic_steps: int, bar: tqdm) -> Path | None:
        """One training step: the critic updates, the generator update, logging, validation, and the
        checkpoint when one is due (its folder is returned)."""
        cfg = self.cfg
        if cfg.stage_steps and self.progress.step == (self.progress.stage + 1) * cfg.stage_steps:
            self._begin_stage(self.progress.stage + 1)
        started = time.perf_counter()
        record: dict[str, float] = {}
        for _ in range(critic_steps):
            critic_losses = self._update("critic", self.method.critic_loss, self.critic_optimizer, self.critic_parameters)
            for name, value in (critic_losses or {}).items():  # mean over the step's critic updates
                record[f"critic/{name}"] = record.get(f"critic/{name}", 0.0) + value.item() / critic_steps
        generator_losses = self._update("generator", self.method.generator_loss, self.generator_optimizer, self.generator_parameters)
        if generator_losses:
            record.update({f"generator/{k}": v.item() for k, v in generator_losses.items()})
            if self.ema is not None:
                self.ema.update()
            if hasattr(self.method, "after_generator_update"):
                self.method.after_generator_update()
        self.progress.step += 1
        self.progress.seconds += time.perf_counter() - started
        record.update(step=self.progress.step, seconds=self.progress.seconds)
        if cfg.stage_steps:
            record["stage"] = self.progress.stage
        if cfg.validation_steps and self.progress.step % cfg.validation_steps == 0:
            record.update(self.run_validation())
        bar.update(1)
        bar.set_postfix({k.replace("/loss", ""): f"{v:.4g}" for k, v in record.items() if k.endswith("/loss")})
        self._log(record)
        if cfg.checkpointing_steps and self.progress.step % cfg.checkpointing_steps == 0:
            return self.save_checkpoint()
        return None

    def summary(self) -> dict:
        """What the run cost: steps, training seconds (validation and checkpoints excluded), steps/s,
        the device, the precision it ran at and this process's peak memory (see :func:`peak_memory_bytes`),
        over the whole run and since the first step (without loading and laying out the networks); on
        several processes also every process's peaks and the layout (collective: all must call it)."""
        device = self.accelerator.device
        training_peak = peak_memory_bytes(device)
        summary = {
            "steps": self.progress.step, "seconds": self.progress.seconds,
            "steps_per_second": self.progress.step / self.progress.seconds if self.progress.seconds else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "num_processes": self.accelerator.num_processes, "mixed_precision": self.accelerator.mixed_precision,
            "peak_memory_bytes": max(training_peak, self.setup_peak_memory),
            "training_peak_memory_bytes": training_peak if self.training_peak_measured else None,
        }
        if self.accelerator.num_processes > 1:  # collective: every process calls summary()
            for key in ("peak_memory_bytes", "training_peak_memory_bytes"):  # -1: not measurable there
                mine = summary[key] if summary[key] is not None else -1
                peaks = self.accelerator.gather(torch.tensor([mine], device=device)).tolist()
                summary[f"{key}_per_process"] = [int(peak) if peak >= 0 else None for peak in peaks]
            summary["layout"] = self.sharding.layout
        return summary

