"""The networks of a distillation run: frozen teacher, student (generator), fake score, discriminator.

Full mode keeps three networks (UNets or transformers): the frozen teacher and two trainable copies
of it. LoRA mode keeps ONE frozen network with two peft LoRA adapters, ``student`` and ``fake_score``,
on the backbone's target modules; the teacher is that network with adapters off. LoRA B-matrices start at zero, so in both modes student and fake score
start as exact copies of the teacher. A full fake score may also be told which step of a
few-step student made its input (:class:`StepEmbedding`), also zero at the start.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule

from stepdistill.diffusion import NoiseProcess
from stepdistill.models.backbones import adapter_for
from stepdistill.models.denoiser import Denoiser, select_adapter
from stepdistill.models.discriminator import Discriminator
from stepdistill.models.guidance_embedding import with_guidance_embedding

STUDENT, FAKE_SCORE, STAGE_TEACHER = "student", "fake_score", "stage_teacher"


class StepEmbedding(nn.Module):
    """One learned vector per generation step of a few-step student, added to the fake score's time
    embedding (the UNet's class-embedding slot), so that one network learns the distribution of each
    step's outputs apart instead of their mixture.

    The table starts at zero, so the fake score starts as the teacher, and is read × ``gain``: Adam
    moves a weight by about the learning rate per update, and at the critic's 1e-4 an unscaled table
    would need thousands of updates to reach the time embedding's scale (mean |·| ≈ 0.3 on the digits teacher).
    """

    def __init__(self, num_steps: int, dim: int, gain: float = 10.0) -> None:
        super().__init__()
        self.table = nn.Embedding(num_steps, dim)
        nn.init.zeros_(self.table.weight)
        self.gain = gain

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return self.gain * self.table(step)


def add_step_embedding(unet: nn.Module, num_steps: int) -> None:
    """Give a full-weight UNet a :class:`StepEmbedding` of ``num_steps`` entries (then every call needs the step)."""
    if unet.class_embedding is not None:
        raise ValueError("this UNet already has a class embedding: a per-step fake score needs that slot free")
    embedding = StepEmbedding(num_steps, unet.time_embedding.linear_2.out_features)
    unet.class_embedding = embedding.to(device=unet.device, dtype=unet.dtype)


def step_embedding_size(unet: nn.Module) -> int:
    """How many steps the UNet's :class:`StepEmbedding` tells apart (0: it has none)."""
    embedding = getattr(unet, "class_embedding", None)
    return embedding.table.num_embeddings if isinstance(embedding, StepEmbedding) else 0


@dataclass
class Networks:
    """What a method may call. ``teacher`` is frozen; the trainer optimises the other three."""

    teacher: Denoiser
    student: Denoiser
    fake_score: Denoiser | None  # None for methods without a critic (consistency distillation)
    discriminator: Discriminator | None

    def generator_parameters(self) -> list[nn.Parameter]:
        return _trainable(self.student.network, STUDENT)

    def critic_parameters(self) -> list[nn.Parameter]:
        params = _trainable(self.fake_score.network, FAKE_SCORE) if self.fake_score is not None else []
        if self.discriminator is not None:
            params += list(self.discriminator.parameters())
        return params


def _trainable(network: nn.Module, adapter: str) -> list[nn.Parameter]:
    """All weights of a full copy, or only the LoRA weights of ``adapter`` on a shared network."""
    if getattr(network, "_hf_peft_config_loaded", False):
        return [p for name, p in network.named_parameters() if f".{adapter}." in name]
    return list(network.parameters())


def lora_config(rank: int, target_modules: tuple[str, ...]) -> LoraConfig:
    """LoRA on ``target_modules`` (the backbone's: attention, feed-forward, convolutions; B = 0 at
    start, scale α/r = 1)."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules))


def add_adapter(network: nn.Module, config: LoraConfig, name: str) -> None:
    """Add a LoRA adapter ``name`` to ``network``; the weights it had keep their ``requires_grad`` (peft
    switches to the new adapter and freezes the others' LoRA weights), and its warning about a second
    adapter, which is the point here, is silenced."""
    trainable = [(param, param.requires_grad) for param in network.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        network.add_adapter(config, adapter_name=name)
    for param, flag in trainable:
        param.requires_grad_(flag)


def build_networks(
    teacher_network: nn.Module,
    process: NoiseProcess,
    use_lora: bool = False,
    lora_rank: int = 16,
    with_discriminator: bool = False,
    with_fake_score: bool = True,
    guidance_embedding_dim: int | None = None,
    fake_score_steps: int = 1,
    student_process: NoiseProcess | None = None,
) -> Networks:
    """Student and (unless ``with_fake_score=False``) fake score initialised from the teacher network,
    full copies or LoRA adapters; ``guidance_embedding_dim`` gives a full UNet student a guidance-scale
    input, ``fake_score_steps`` > 1 a full UNet fake score a :class:`StepEmbedding` of that many steps.
    ``student_process`` reads the student's output in another parameterisation than the teacher's
    (:meth:`~stepdistill.diffusion.NoiseProcess.for_few_steps`)."""
    backbone = adapter_for(teacher_network)
    if (guidance_embedding_dim is not None or fake_score_steps > 1) and not backbone.has_embedding_slots():
        raise ValueError(f"guidance-scale and step embeddings are for UNets; a {type(teacher_network).__name__} "
                         "has no time-embedding slot for them")
    if guidance_embedding_dim is not None and use_lora:
        raise ValueError("a guidance-scale input needs a full-weight student: LoRA cannot add the projection layer")
    if fake_score_steps < 1:
        raise ValueError(f"fake_score_steps must be ≥ 1 (got {fake_score_steps})")
    if fake_score_steps > 1 and not with_fake_score:
        raise ValueError("fake_score_steps > 1 needs a fake score (with_fake_score=True)")
    if fake_score_steps > 1 and use_lora:
        raise ValueError("a per-step fake score needs a full-weight fake score: LoRA adapters share the UNet with "
                         "the teacher, which has no step input")
    teacher_network.requires_grad_(False).eval()
    adapters = (STUDENT, FAKE_SCORE) if with_fake_score else (STUDENT,)
    if use_lora:
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be ≥ 1 (got {lora_rank})")
        for adapter in adapters:
            add_adapter(teacher_network, lora_config(lora_rank, backbone.lora_target_modules), adapter)
        for name, param in teacher_network.named_parameters():
            param.requires_grad_(".lora_" in name)  # every adapter trainable, the base frozen
        select_adapter(teacher_network, STUDENT)
        student_network = fake_network = teacher_network
    else:
        student_network = (copy.deepcopy(teacher_network) if guidance_embedding_dim is None
                           else with_guidance_embedding(teacher_network, guidance_embedding_dim))
        student_network.requires_grad_(True).train()
        fake_network = copy.deepcopy(teacher_network).requires_grad_(True).train() if with_fake_score else None
        if fake_score_steps > 1:
            add_step_embedding(fake_network, fake_score_steps)
    discriminator = None
    if with_discriminator:
        discriminator = Discriminator({backbone.feature_layer: backbone.feature_channels(teacher_network)})
    return Networks(
        teacher=Denoiser(teacher_network, process, adapter=None),
        student=Denoiser(student_network, student_process or process, adapter=STUDENT if use_lora else None),
        fake_score=(Denoiser(fake_network, process, adapter=FAKE_SCORE if use_lora else None)
                    if with_fake_score else None),
        discriminator=discriminator,
    )


def plain_copy(network: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new, plain (unwrapped) network of ``network``'s class and config, with its LoRA adapters,
    holding ``state`` (every weight whole, e.g. gathered from a sharded run), in its dtype and on its
    device: what export and scoring read after a multi-process run."""
    network_class = next(c for c in type(network).__mro__ if not issubclass(c, FSDPModule))  # the class before wrapping
    settings = {k: v for k, v in network.config.items() if not k.startswith("_")}
    copy_ = network_class.from_config(settings)
    for name, config in getattr(network, "peft_config", {}).items():
        add_adapter(copy_, copy.deepcopy(config), name)
    copy_.load_state_dict(state)
    sample = next(iter(state.values()))
    return copy_.to(device=network.device, dtype=sample.dtype).requires_grad_(False).eval()


class StageTeacher:
    """A frozen copy of the student as it was at the last stage hand-over: the next teacher of a staged
    method (progressive distillation). A full student is copied whole; a LoRA student's adapter is
    copied into a second adapter, ``stage_teacher``, on the shared network, so the base (the original
    teacher, and what an exported LoRA applies to) never changes.

    ``denoiser`` calls the copy in the student's own parameterisation; :meth:`copy_student` refreshes it.
    """

    def __init__(self, student: Denoiser) -> None:
        self.student = student
        network = student.network
        if student.adapter is None:
            network = copy.deepcopy(network).requires_grad_(False).eval()
        else:
            add_adapter(network, copy.deepcopy(network.peft_config[student.adapter]), STAGE_TEACHER)
            for name, param in network.named_parameters():
                if f".{STAGE_TEACHER}." in name:
                    param.requires_grad_(False)
        self.denoiser = Denoiser(network, student.process, adapter=None if student.adapter is None else STAGE_TEACHER)
        self.copy_student()

    def _pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, copy's tensor, student's tensor) for every weight the copy holds."""
        if self.student.adapter is None:
            own = self.denoiser.network.state_dict()
            return [(name, own[name], tensor) for name, tensor in self.student.network.state_dict().items()]
        tensors = dict(self.student.network.named_parameters())
        source = f".{self.student.adapter}."
        return [(name, tensor, tensors[name.replace(f".{STAGE_TEACHER}.", source)])
                for name, tensor in tensors.items() if f".{STAGE_TEACHER}." in name]

    @torch.no_grad()
    def copy_student(self) -> None:
        """The stage hand-over: the copy becomes the student as it is now."""
        for _, own, student in self._pairs():
            own.copy_(student)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: own for name, own, _ in self._pairs()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pairs = self._pairs()
        if set(state) != {name for name, _, _ in pairs}:
            raise KeyError(f"the saved stage teacher holds other weights ({len(state)} tensors, this run's has "
                           f"{len(pairs)})")
        for name, own, _ in pairs:
            own.copy_(state[name])
