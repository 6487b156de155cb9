"""Several processes on torch's FSDP2 engine (``fully_shard``): data parallel or sharded training.

``fully_shard`` turns a module into an FSDP module *in place*: its parameters become DTensors split
over a device mesh, and hooks on its forward all-gather them when it runs and free them after. Methods
therefore keep calling the raw networks (several losses, LoRA adapters switched on one shared UNet,
a frozen teacher between trained copies), which a wrapper such as DDP's would not allow.

Two layouts of the same engine:

- ``replicate`` (data parallelism): an N × 1 mesh, every process holds all weights, gradients are
  all-reduced (averaged) over the N replicas during backward;
- ``shard`` (FSDP, ZeRO-3): a 1 × N mesh, every process holds 1/N of each weight, of its gradient and
  of AdamW's moments; each block's weights are all-gathered for its forward and backward and freed
  after, gradients reduce-scattered. Peak memory per process ≈ (weights + gradients + optimiser
  state + an EMA) / N + the largest gathered block + activations.

Either way a process sees averaged gradients on the parameters it holds, so the optimiser step, the
EMA and checkpoints are the same code for both; checkpoints go through torch's distributed
checkpoint (each process writes its own shards), and :func:`gather` brings a network back whole for
export and scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

LAYOUTS = ("replicate", "shard")
SHARDED_STATE = "sharded_state"  # the distributed checkpoint's folder inside a checkpoint


def resolve_layout(requested: str, fsdp_configured: bool) -> str:
    """The layout of ``requested`` (``auto``, or one of :data:`LAYOUTS`): ``auto`` shards when
    accelerate is configured for FSDP (``distributed_type: FSDP``), else replicates."""
    if requested == "auto":
        return "shard" if fsdp_configured else "replicate"
    if requested not in LAYOUTS:
        raise ValueError(f"layout must be auto or one of {LAYOUTS} (got {requested!r})")
    return requested


@dataclass(frozen=True)
class Sharding:
    """How the networks of a run are laid over its processes (module docstring).

    ``param_dtype``: the dtype weights are gathered and computed in (bf16 under ``--mixed_precision
    bf16``; ``None``: as stored, fp32); gradients are reduced in fp32 either way."""

    layout: str
    mesh: DeviceMesh
    param_dtype: torch.dtype | None = None

    @classmethod
    def over_processes(cls, layout: str, device: torch.device, param_dtype: torch.dtype | None = None) -> Sharding:
        """A mesh over every process of the (initialised) default process group."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} (got {layout!r})")
        world = torch.distributed.get_world_size()
        shape = (world, 1) if layout == "replicate" else (1, world)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
        return cls(layout, mesh, param_dtype)

    @property
    def mixed_precision(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)

    def wrap(self, network: nn.Module) -> None:
        """Make ``network`` an FSDP module in place, each of its :func:`units` gathered only while it
        runs and freed after every forward, so each forward also re-reads which weights take gradient."""
        options = dict(mesh=self.mesh, reshard_after_forward=True)
        for unit in units(network):
            fully_shard(unit, mp_policy=self.mixed_precision, **options)
        # the network's own inputs stay as given: cast to bf16, timesteps would round (999 → 1000); each
        # unit casts what it reads
        fully_shard(network, mp_policy=replace(self.mixed_precision, cast_forward_inputs=False), **options)


def units(network: nn.Module) -> list[nn.Module]:
    """The parts a network is laid out in: every child that holds weights, the members of a list of
    blocks one by one (a UNet's down/up blocks, a transformer's blocks), so that the network itself
    keeps no weights of its own. Each unit's weights are gathered when the unit runs and again in
    backward when its output is used, which a loss on an inner layer's features (a discriminator on
    the mid block) needs: the network's own output then takes no part in backward."""
    parts = []
    for child in network.children():
        members = list(child) if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child]
        parts += [m for m in members if any(True for _ in m.parameters())]
    return parts


def agreed(value: int) -> int:
    """``value`` as the main process drew it, on every process (collective when several run; itself on
    one). For random draws that decide how many times a network runs in a step: under sharding every
    forward is a collective, so each process must run the same number."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def gather(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and buffer of a wrapped ``network``, whole and on the CPU, on the main process
    (an empty dict on the others; collective: all must call it); keys as in the unwrapped network's
    ``state_dict()``."""
    return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write the wrapped ``modules``' weights, the ``optimizers``' states (each over its own module's
    parameters) and named groups of extra (D)tensors (an EMA, a method's state) to ``folder`` as one
    distributed checkpoint; every process writes its own shards (collective)."""
    dcp.save(_state(modules, optimizers, tensors), checkpoint_id=str(folder))


def load(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Read back what :func:`save` wrote into the same modules and optimisers, and into ``tensors``
    in place (a group made afresh, e.g. by a method's ``state_dict()``, is then handed back by the caller)."""
    if not folder.is_dir():
        raise ValueError(f"it holds no {folder.name}/: it was written by a one-process run (or a multi-process one "
                         "before runs were laid out by FSDP2), and a checkpoint resumes on the processes that wrote it")
    state = _state(modules, optimizers, tensors)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except CheckpointException:  # a BaseException: say it as the ValueError callers expect
        raise ValueError(f"the shards in {folder} do not match this run's networks and processes") from None
    for name, module in modules.items():
        set_model_state_dict(module, state[f"model.{name}"])
    for name, (module, optimizer) in _optimizer_modules(modules, optimizers).items():
        set_optimizer_state_dict(module, optimizer, state[f"optimizer.{name}"])


def _optimizer_modules(modules, optimizers) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """Each optimiser with the module its parameters belong to (the modules' union, as one container)."""
    container = nn.ModuleDict(modules)
    return {name: (container, optimizer) for name, optimizer in optimizers.items()}


def _state(modules, optimizers, tensors) -> dict:
    state: dict = {f"model.{name}": get_model_state_dict(module) for name, module in modules.items()}
    for name, (module, optimizer) in _optimizer_modules(modules, optimizers).items():
        state[f"optimizer.{name}"] = get_optimizer_state_dict(module, optimizer)
    for group, named in tensors.items():
        state.update({f"{group}.{key}": tensor for key, tensor in named.items()})
    return state
