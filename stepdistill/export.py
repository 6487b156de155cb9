"""Writing a student so that plain diffusers samples it correctly, and reading it back.

Students sample with :func:`stepdistill.diffusion.few_step_sample` (predict x̂0, re-noise to the
next timestep with fresh noise), except deterministic ones (progressive distillation), which take
DDIM steps (:func:`stepdistill.diffusion.ddim_sample`) and export with :func:`ddim_scheduler`.

**Rectified-flow teachers** (SD3, Flux): diffusers' ``FlowMatchLCMScheduler`` computes exactly that
(x̂0 = x − σ v̂, then (1 − σ') x̂0 + σ' ε). It is exported with the teacher's shift made static
(Flux's dynamic shift evaluated at the training resolution) and ``use_dynamic_shifting=False``: the
scheduler applies its shift *after* whatever sigmas the pipeline passes in (Flux's pipeline passes
linspace(1, 1/N, N), SD3's none), so the grid the student trains on is read off the scheduler called
the way its pipeline calls it (:func:`student_timesteps`), never computed beside it.

**Variance-preserving teachers**: diffusers' ``LCMScheduler`` computes exactly that when its
consistency boundary mix is switched off: its output is c_skip(t)·x_t + c_out(t)·x̂0 with
c_skip = σ_d² / ((s t)² + σ_d²), and with ``timestep_scaling`` s = 1e4 we get c_skip < 1e-8 for
every t ≥ 1 (s = 10, LCM's own value, leaves ~1e-7). The timesteps an N-step student is trained
on are read off that scheduler, so training and sampling agree by construction. Consistency
students are trained with the boundary mix (s = 10) and exported with it, on their solver grid
(``original_inference_steps``): pass that ``student_scheduler`` to the export functions.

* full weights: a complete pipeline folder (``DiffusionPipeline.from_pretrained(output_dir)``);
* LoRA: ``pytorch_lora_weights.safetensors`` in diffusers' format (``pipe.load_lora_weights``, on the
  UNet or the transformer) plus ``scheduler/scheduler_config.json`` for the student scheduler's
  ``from_pretrained(output_dir, subfolder="scheduler")``.

Sample a student with ``guidance_scale=1`` (its guidance is distilled in) and its number of steps; a
student that takes the guidance scale as an input samples at any w of its training range instead
(``stepdistill_student.json`` records the one it was scored at).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from peft.utils import get_peft_model_state_dict
from torch import nn

from stepdistill.diffusion import FlowProcess, NoiseProcess
from stepdistill.models.backbones import Backbone, adapter_for
from stepdistill.models.loading import PipelineError, load_pipeline

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TIMESTEP_SCALING = 1e4


def student_scheduler(
    teacher_scheduler,
    process: NoiseProcess,
    timestep_scaling: float = TIMESTEP_SCALING,
    original_inference_steps: int = 50,
    first_timestep: int | None = None,
) -> SchedulerMixin:
    """The scheduler that samples the student exactly: ``FlowMatchLCMScheduler`` at the process's
    static shift on a flow teacher (the other arguments are for variance-preserving teachers: a flow
    consistency student is sampled at the σ's its pipeline asks for, which need not lie on its
    training grid, as a consistency function is defined at every σ), else an ``LCMScheduler`` on the
    teacher's noise schedule.

    ``timestep_scaling``: 1e4 switches the boundary mix off (DMD students), 10 is LCM's consistency
    function; ``original_inference_steps`` N puts N-step sampling on the grid t = k·n − 1, k = T / N.

    ``first_timestep`` t₀ < T − 1: a student that starts from pure noise at t₀ (SiD's "initial
    timestep"). LCMScheduler always starts at its last training timestep, so the exported schedule
    is the teacher's truncated there: the teacher's first t₀ + 1 betas, every timestep on the grid
    (then 1 step visits t₀, 4 steps t₀ and three more spread below it). The ᾱ_t the student sees are
    the teacher's, unchanged.
    """
    if isinstance(process, FlowProcess):
        if first_timestep is not None:
            raise ValueError("a flow-matching student starts from pure noise at σ = 1; first_timestep is for "
                             "variance-preserving teachers")
        return FlowMatchLCMScheduler.from_config(_settings_taken_by(FlowMatchLCMScheduler, teacher_scheduler.config),
                                                 shift=process.shift, use_dynamic_shifting=False)
    settings = dict(
        timestep_scaling=timestep_scaling, clip_sample=False, thresholding=False, set_alpha_to_one=True,
        timestep_spacing="trailing", original_inference_steps=original_inference_steps,
    )
    last = teacher_scheduler.config.num_train_timesteps - 1
    if first_timestep is not None and first_timestep != last:
        if not 0 < first_timestep < last:
            raise ValueError(f"first_timestep must be in [1, {last}] (got {first_timestep})")
        betas = teacher_scheduler.betas[: first_timestep + 1].tolist()  # already zero-SNR-rescaled if the teacher is
        settings.update(trained_betas=betas, num_train_timesteps=len(betas), original_inference_steps=len(betas),
                        rescale_betas_zero_snr=False)
    return LCMScheduler.from_config(_settings_taken_by(LCMScheduler, teacher_scheduler.config), **settings)


def ddim_scheduler(teacher_scheduler, process: NoiseProcess) -> SchedulerMixin:
    """The deterministic scheduler of a student that samples by DDIM steps (progressive distillation):
    diffusers' ``DDIMScheduler`` with "trailing" spacing, the final step to ᾱ = 1 (it returns x̂0) and
    the ``process``'s prediction type on a variance-preserving teacher; the flow-matching Euler
    scheduler at the process's static shift on a flow teacher (its Euler step is the DDIM step)."""
    if isinstance(process, FlowProcess):
        return FlowMatchEulerDiscreteScheduler.from_config(
            _settings_taken_by(FlowMatchEulerDiscreteScheduler, teacher_scheduler.config), shift=process.shift,
            use_dynamic_shifting=False)
    return DDIMScheduler.from_config(
        _settings_taken_by(DDIMScheduler, teacher_scheduler.config), prediction_type=process.prediction_type,
        timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1, clip_sample=False, thresholding=False)


def sampling_grid(scheduler: SchedulerMixin, num_steps: int, backbone: Backbone | None = None) -> torch.Tensor:
    """The N + 1 points (float64, noisiest first) a deterministic ``scheduler`` (:func:`ddim_scheduler`)
    steps through in ``num_steps`` steps: the N timesteps it visits, then where its last step lands, the
    clean end (σ = 0 on a flow; −1, DDIM's ᾱ = 1, on a variance-preserving teacher).

    ``DDIMScheduler`` steps from t to t − T // N whatever its timesteps are, so N must divide T for those
    steps to land on its own next timesteps (the grid a student trains on); other N are refused.
    """
    timesteps = torch.tensor(student_timesteps(scheduler, num_steps, backbone), dtype=torch.float64)
    if isinstance(scheduler, DDIMScheduler):
        jump = scheduler.config.num_train_timesteps // num_steps
        grid = torch.cat([timesteps, timesteps[-1:] - jump])
        if not torch.equal(grid[1:], timesteps - jump) or grid[-1] != -1:
            raise ValueError(f"{num_steps} DDIM steps do not land on DDIM's own timesteps: the number of steps must "
                             f"divide the teacher's {scheduler.config.num_train_timesteps} training timesteps")
        return grid
    return torch.cat([timesteps, torch.zeros(1, dtype=torch.float64)])


def steps_on(scheduler: SchedulerMixin, grid: torch.Tensor, backbone: Backbone | None = None) -> bool:
    """Whether a deterministic ``scheduler`` samples in ``len(grid) − 1`` steps exactly on ``grid``
    (:func:`sampling_grid`), so that an export samples the student as it was trained."""
    try:
        return torch.equal(sampling_grid(scheduler, len(grid) - 1, backbone), grid.double())
    except ValueError:
        return False


def _settings_taken_by(scheduler_class: type[SchedulerMixin], config: dict) -> dict:
    """The entries of a teacher's scheduler config that ``scheduler_class`` takes: the others (PNDM's
    ``skip_prk_steps``, DDPM's ``variance_type``) would be saved with the student and warned about
    whenever it loads."""
    taken = inspect.signature(scheduler_class.__init__).parameters
    return {key: value for key, value in config.items() if key in taken}


def student_timesteps(scheduler: SchedulerMixin, num_steps: int, backbone: Backbone | None = None) -> tuple[float, ...]:
    """The timesteps the exported scheduler visits in ``num_steps`` steps when ``backbone``'s pipeline
    calls it (1 step: ``(999,)`` on SD's schedule, ``(1000.0,)`` = σ 1 on a flow teacher)."""
    if num_steps < 1:
        raise ValueError(f"num_student_steps must be ≥ 1 (got {num_steps})")
    sigmas = backbone.scheduler_sigmas(num_steps) if backbone is not None else None
    if sigmas is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(sigmas=sigmas)
    return tuple(t.item() for t in scheduler.timesteps)


STUDENT_METADATA = "stepdistill_student.json"


def _write_metadata(
    output_dir: Path, num_steps: int, timesteps: tuple[float, ...], kind: str, guidance_scale: float,
    scheduler: SchedulerMixin, resolution: int | None, base_model: str | None = None,
) -> None:
    info = {
        "format": kind,
        **({"base_model": base_model} if base_model else {}),
        **({"resolution": resolution} if resolution else {}),
        "num_inference_steps": num_steps,
        "timesteps": list(timesteps),
        **({"sigmas": [round(s, 7) for s in scheduler.sigmas[:-1].tolist()]} if hasattr(scheduler, "sigmas") else {}),
        "guidance_scale": guidance_scale,
        "scheduler": type(scheduler).__name__,
    }
    (output_dir / STUDENT_METADATA).write_text(json.dumps(info, indent=2) + "\n")


def export_full(
    teacher_pipeline: DiffusionPipeline,
    student_network: nn.Module,
    output_dir: str | Path,
    num_steps: int,
    scheduler: SchedulerMixin,
    guidance_scale: float = 1.0,
    resolution: int | None = None,
) -> Path:
    """Save the teacher's pipeline with the student's network (UNet or transformer) and the student
    ``scheduler`` (:func:`student_scheduler`); ``guidance_scale`` is the one to sample at (1 unless the
    network takes it as an input). ``resolution``, the side the student was trained at, is recorded
    and becomes the pipeline's default size where the network's config holds one (UNets, SD3;
    a Flux pipeline's default is fixed: pass ``height``/``width``)."""
    output_dir = Path(output_dir)
    backbone = adapter_for(student_network)
    timesteps = student_timesteps(scheduler, num_steps, backbone)
    components = {**teacher_pipeline.components, backbone.component: student_network, "scheduler": scheduler}
    pipeline_class = type(teacher_pipeline)
    settings = {  # the pipeline's own non-module arguments, e.g. requires_safety_checker
        name: value for name, value in teacher_pipeline.config.items()
        if name not in components and name in inspect.signature(pipeline_class.__init__).parameters
    }
    student_pipeline = pipeline_class(**components, **settings)
    trained_size = resolution // teacher_pipeline.vae_scale_factor if resolution else None
    own_size = student_network.config.get("sample_size")
    if own_size is not None and trained_size is not None:
        student_network.register_to_config(sample_size=trained_size)  # saved as the pipeline's default ...
    try:
        student_pipeline.save_pretrained(output_dir, safe_serialization=True)
    finally:
        if own_size is not None:
            student_network.register_to_config(sample_size=own_size)  # ... and the live network left as it was
    _write_metadata(output_dir, num_steps, timesteps, "full", guidance_scale, scheduler, resolution)
    return output_dir


def export_lora(
    teacher_pipeline: DiffusionPipeline,
    network: nn.Module,
    adapter: str,
    output_dir: str | Path,
    num_steps: int,
    scheduler: SchedulerMixin,
    resolution: int | None = None,
) -> Path:
    """Save one peft adapter of ``network`` (UNet or transformer) as diffusers LoRA weights plus the
    student ``scheduler`` (:func:`student_scheduler`); ``resolution``, the side it was trained at, is
    recorded (the base decides the pipeline's default size)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    backbone = adapter_for(network)
    state = get_peft_model_state_dict(network, adapter_name=adapter)  # diffusers reads peft keys as they are
    backbone.save_lora_weights(teacher_pipeline, output_dir, state)
    scheduler.save_pretrained(output_dir / "scheduler")
    _write_metadata(output_dir, num_steps, student_timesteps(scheduler, num_steps, backbone), "lora", 1.0, scheduler,
                    resolution, base_model=teacher_pipeline.name_or_path)
    return output_dir


def load_lora_student(
    teacher_path: str | Path, lora_dir: str | Path, revision: str | None = None, variant: str | None = None
) -> DiffusionPipeline:
    """The teacher pipeline with a LoRA student loaded and the student scheduler set."""
    pipe = load_pipeline(teacher_path, revision=revision, variant=variant)
    pipe.load_lora_weights(str(lora_dir))
    config = json.loads((Path(lora_dir) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config["_class_name"])
    pipe.scheduler = scheduler_class.from_pretrained(str(lora_dir), subfolder="scheduler")
    return pipe


def load_student(
    student_dir: str | Path, base_model: str | Path | None = None, revision: str | None = None,
    variant: str | None = None,
) -> tuple[DiffusionPipeline, float]:
    """Any exported student as a diffusers pipeline, with the guidance scale to sample it at.

    Full exports load as they are; LoRA exports onto ``base_model`` (default: the teacher they were
    trained on, as recorded at export).
    """
    student_dir = Path(student_dir)
    metadata = student_dir / STUDENT_METADATA
    if not metadata.is_file():
        raise PipelineError(f"{student_dir} is not a stepdistill student (no {STUDENT_METADATA}); "
                            "give the student folder a recipe wrote, e.g. outputs/dmd2/student")
    info = json.loads(metadata.read_text())
    if info["format"] == "full":
        return load_pipeline(student_dir), info["guidance_scale"]
    base_model = base_model or info.get("base_model")
    if base_model is None:
        raise PipelineError(f"{student_dir} holds LoRA weights; give the base model they were trained on")
    return load_lora_student(base_model, student_dir, revision, variant), info["guidance_scale"]


def load_any(
    name_or_path: str | Path, base_model: str | Path | None = None, revision: str | None = None,
    variant: str | None = None,
) -> tuple[DiffusionPipeline, dict]:
    """Whatever a user asks to score, as a diffusers pipeline, and a description of what was loaded:

    * a student folder a recipe wrote (``stepdistill_student.json``): :func:`load_student`, a LoRA one onto
      ``base_model`` or the base recorded at export;
    * LoRA weights from elsewhere (a ``.safetensors`` file, or a folder holding one, no metadata) onto
      ``base_model``, which is then required; the base's scheduler stays;
    * a pipeline folder or hub id, as it is.

    The description holds ``loaded`` (student, lora, pipeline), ``base_model`` where a LoRA went onto
    one, and a student's recorded ``student_guidance_scale``, ``student_num_inference_steps`` and
    ``student_resolution`` (the side it was trained at).
    """
    path = Path(name_or_path).expanduser()
    if (path / STUDENT_METADATA).is_file():
        info = json.loads((path / STUDENT_METADATA).read_text())
        pipe, guidance_scale = load_student(path, base_model, revision, variant)
        described = {"loaded": f"student ({info['format']})", "student_guidance_scale": guidance_scale,
                     "student_num_inference_steps": info["num_inference_steps"],
                     **({"student_resolution": info["resolution"]} if "resolution" in info else {})}
        if info["format"] == "lora":
            described["base_model"] = str(base_model or info.get("base_model"))
        return pipe, described
    lora_file = path if path.suffix == ".safetensors" else path / LORA_WEIGHTS
    if lora_file.is_file():
        if base_model is None:
            raise PipelineError(f"{name_or_path} holds LoRA weights without {STUDENT_METADATA}; give the base model "
                                "they belong to with --pretrained_model_name_or_path")
        pipe = load_pipeline(base_model, revision=revision, variant=variant)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        return pipe, {"loaded": "lora", "base_model": str(base_model)}
    return load_pipeline(name_or_path, revision=revision, variant=variant), {"loaded": "pipeline"}
