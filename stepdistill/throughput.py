"""``python -m stepdistill throughput``: training step time and peak memory of every recipe on a
network the size of Stable Diffusion 1.5's UNet.

    python -m stepdistill throughput                                   # GPU: 512 px latents (64×64)
    python -m stepdistill throughput --latent_size 32 --precisions no  # CPU: 256 px, fp32 (minutes per setting)
    python -m stepdistill throughput --recipes dmd2 --variants full --num_processes 1,2,4   # FSDP: memory per GPU

Timing does not depend on weight values, so the UNet is SD1.5's architecture (860 M parameters, its
published config) with random weights, inside a pipeline whose text encoder (768-d, 77 tokens) and
VAE are small: they run once per batch, outside the timed UNet work. Each setting (recipe × LoRA /
full weights / full weights with gradient checkpointing × precision) runs the real recipe in a
process of its own on a few captioned random images, ``--max_train_steps`` steps at
``--train_batch_size``; the step time is the median of the steps after the first (which allocates).
A setting whose weights and AdamW state would not fit in memory is skipped with its estimate, rather
than run into the out-of-memory killer. LoRA with gradient checkpointing is not a setting: the
recipes refuse it (the recomputed forward would run with the wrong adapter).

``--num_processes`` above 1 launches each setting as that many processes (``torch.distributed.run``)
sharding every network with FSDP2 (``--parallelism fsdp``) at the same batch per process, and reports
each process's peak memory: what sharding buys per GPU. On one machine the processes share its
memory, so a CPU setting is skipped when all of them together would not fit; ``--unet_width`` scales
the channel widths to show the scaling on a CPU (0.5: ~¼ of the parameters).

Writes ``throughput.json`` and ``throughput.md`` to ``--output_dir``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from stepdistill import config as configs
from stepdistill.assets import RECIPES_DIR
from stepdistill.bench import BENCHMARKED_RECIPES, RecipeFailed, command_main, machine
from stepdistill.config import ConfigError, field
from stepdistill.models import tiny_sd

# Stable Diffusion 1.5's UNet (its published unet/config.json); sample_size is set per run.
SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
VARIANTS = {"lora": ["--use_lora", "true"], "full": ["--use_lora", "false"],
            "full+gc": ["--use_lora", "false", "--gradient_checkpointing", "true"]}
# UNet copies held in memory (frozen + trained) and trained copies (gradients and AdamW's two moments)
NETWORK_COPIES = {"dmd2": (3, 2), "sid": (3, 2), "consistency": (2, 1)}


@dataclass
class ThroughputConfig:
    """Time one training step of every recipe on an SD1.5-sized UNet."""

    recipes: tuple[str, ...] = field(BENCHMARKED_RECIPES, "recipes to time, comma-separated")
    variants: tuple[str, ...] = field(tuple(VARIANTS), "lora, full, full+gc (full weights, gradient checkpointing)")
    precisions: tuple[str, ...] = field(("no", "bf16"), "--mixed_precision settings: no (fp32), bf16, fp16")
    latent_size: int = field(64, "latent height and width (64: SD1.5's 512 px; 32: 256 px, for CPUs)")
    num_processes: tuple[int, ...] = field((1,), "processes per setting, comma-separated (> 1: the networks "
                                                  "sharded over them with FSDP2)")
    unet_width: float = field(1.0, "fraction of SD1.5's channel widths (1: SD1.5 itself; 0.5 for CPUs)",
                              greater_than=0)
    train_batch_size: int = field(1, "batch size of every update (per process)")
    max_train_steps: int = field(3, "steps per setting; the first is not timed")
    output_dir: str = field("benchmarks/throughput", "where throughput.json / .md (and the scratch model) go")

    def validate(self) -> None:
        for recipe in self.recipes:
            if recipe not in NETWORK_COPIES:
                raise ConfigError(f"--recipes: {recipe!r} is not timed here (choose from {', '.join(NETWORK_COPIES)})")
        for variant in self.variants:
            if variant not in VARIANTS:
                raise ConfigError(f"--variants: unknown {variant!r} (choose from {', '.join(VARIANTS)})")
        for precision in self.precisions:
            if precision not in ("no", "bf16", "fp16"):
                raise ConfigError(f"--precisions: unknown {precision!r} (choose from no, bf16, fp16)")
        if self.latent_size < 8 or self.latent_size % 8:
            raise ConfigError(f"--latent_size must be a multiple of 8, ≥ 8 (got {self.latent_size})")
        if self.max_train_steps < 2:
            raise ConfigError(f"--max_train_steps must be ≥ 2: the first step is not timed (got {self.max_train_steps})")
        if any(n < 1 for n in self.num_processes):
            raise ConfigError(f"--num_processes must all be ≥ 1 (got {self.num_processes})")
        widths = unet_channels(self.unet_width)
        if any(width % SD15_UNET["norm_num_groups"] for width in widths):
            raise ConfigError(f"--unet_width {self.unet_width} gives channels {widths}: each must be a multiple of "
                              f"{SD15_UNET['norm_num_groups']} (the UNet's group norm); try 1, 0.5 or 0.4")
        if self.train_batch_size < 1:
            raise ConfigError(f"--train_batch_size must be ≥ 1 (got {self.train_batch_size})")
        configs.require_writable_dir(self.output_dir, "--output_dir")


def unet_channels(width: float) -> tuple[int, ...]:
    """SD1.5's block widths scaled by ``width``."""
    return tuple(round(width * channels) for channels in SD15_UNET["block_out_channels"])


def build_sd15_sized_pipeline(folder: Path, latent_size: int, width: float = 1.0) -> int:
    """Save a pipeline with SD1.5's UNet architecture (random weights; channel widths × ``width``) to
    ``folder``; its UNet's parameter count."""
    config = tiny_sd.TinySDConfig(text_hidden_size=768, text_layers=1, vae_channels=(8, 8, 8, 8),
                                  image_size=8 * latent_size, max_length=77)
    pipe = tiny_sd.build_pipeline(folder, config, seed=0)
    pipe.unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": unet_channels(width)}, sample_size=latent_size)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in pipe.unet.parameters())


def write_image_folder(folder: Path, image_size: int, count: int = 8) -> None:
    """``count`` random images with digit captions and a ``metadata.jsonl``: data for any recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(count):
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": f"a handwritten digit {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def memory_estimate(recipe: str, variant: str, num_parameters: int) -> int:
    """Bytes of fp32 UNet weights, gradients and AdamW moments a setting holds over all its processes
    (activations not counted; sharded, each process holds its share)."""
    copies, trained = NETWORK_COPIES[recipe] if variant != "lora" else (1, 0)
    return 4 * num_parameters * (copies + 3 * trained)


def fits(needed: int, num_processes: int, device: str) -> tuple[bool, str]:
    """Whether a setting needing ``needed`` bytes over ``num_processes`` processes fits, and what it was
    compared with: each process's share against one GPU, or the total against the CPU's memory."""
    available = memory_available(device)
    share = needed / num_processes if device == "cuda" else needed
    where = "per GPU" if device == "cuda" else "on this machine"
    return share <= 0.9 * available, (f"needs ≈ {share / 2**30:.0f} GiB for weights and AdamW {where}, "
                                      f"{available / 2**30:.0f} GiB available")


def memory_available(device: str) -> int:
    """Bytes the setting may use: the GPU's memory, or the CPU's available memory (``MemAvailable``)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the available memory from /proc/meminfo")


def time_setting(
    cfg: ThroughputConfig, recipe: str, variant: str, precision: str, model: Path, data: Path, num_processes: int = 1,
) -> dict:
    """Run one setting; its median step time (steps after the first), steps/s and peak memory (the
    largest process's, and every process's when several run)."""
    run_dir = Path(cfg.output_dir) / "runs" / f"{recipe}_{variant}_{precision}_{num_processes}"
    launcher = [sys.executable]
    if num_processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(num_processes)]
    command = [
        *launcher, str(RECIPES_DIR / f"{recipe}.py"), "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data), "--output_dir", str(run_dir), "--max_train_steps", str(cfg.max_train_steps),
        "--train_batch_size", str(cfg.train_batch_size), "--mixed_precision", precision,
        "--validation_steps", "0", "--eval_num_samples", "0", *VARIANTS[variant],
        *(["--parallelism", "fsdp"] if num_processes > 1 else []),
    ]
    print(f"[throughput] {recipe}, {variant}, {precision}, {num_processes} process(es)", flush=True)
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        tail = (finished.stdout + finished.stderr).replace("\r", "\n").strip().splitlines()[-5:]
        raise RecipeFailed(f"{recipe} ({variant}, {precision}) failed (exit {finished.returncode}):\n" + "\n".join(tail))
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    seconds = [rows[0]["seconds"]] + [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
    training = json.loads((run_dir / "report.json").read_text())["training"]
    shutil.rmtree(run_dir)  # the exported student is a full copy of the UNet: do not keep one per setting
    step = statistics.median(seconds[1:])
    peaks = training.get("peak_memory_bytes_per_process", [training["peak_memory_bytes"]])
    training_peaks = training.get("training_peak_memory_bytes_per_process", [training["training_peak_memory_bytes"]])
    return {"seconds_per_step": step, "steps_per_second": 1 / step, "first_step_seconds": seconds[0],
            "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_process": peaks,
            "training_peak_memory_bytes_per_process": training_peaks, "device": training["device"]}


def markdown(summary: dict) -> str:
    m = summary["machine"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpu_cores']} cores)"
    last = summary["config"]["max_train_steps"]
    width = summary["config"].get("unet_width", 1.0)
    timed_steps = "step 2 timed" if last == 2 else f"median of steps 2–{last}"
    lines = [
        f"Measured {m['date']} on {where}, torch {m['torch']}, by "
        f"`{summary['command']}`: a UNet of SD1.5's architecture ({summary['unet_parameters'] / 1e6:.0f} M parameters"
        f"{'' if width == 1 else f', channel widths × {width}'}), "
        f"{summary['config']['latent_size']}×{summary['config']['latent_size']} latents, batch "
        f"{summary['config']['train_batch_size']} per process; {timed_steps}. Peak memory "
        f"is {'torch.cuda.max_memory_allocated' if m['gpu'] else 'the process RSS'}, per process, over the "
        "whole run and from the first step on (without loading and laying out the networks); several "
        "processes shard every network with FSDP2 (`--parallelism fsdp`).",
        "",
        "| recipe | weights | precision | processes | s/step | steps/s | peak memory per process (GiB) | "
        "from the first step (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["settings"]:
        precision = "fp32" if row["precision"] == "no" else row["precision"]
        setting = f"| {row['recipe']} | {row['variant']} | {precision} | {row.get('num_processes', 1)} |"
        if "skipped" in row:
            lines.append(f"{setting} skipped: {row['skipped']} | | | |")
        else:
            peaks, training = (" / ".join("–" if peak is None else f"{peak / 2**30:.1f}" for peak in row[key])
                               for key in ("peak_memory_bytes_per_process", "training_peak_memory_bytes_per_process"))
            lines.append(f"{setting} {row['seconds_per_step']:.2f} | {row['steps_per_second']:.3f} | {peaks} | "
                         f"{training} |")
    return "\n".join(lines) + "\n"


def run(cfg: ThroughputConfig, command: str = "python -m stepdistill throughput") -> dict:
    output_dir = Path(cfg.output_dir)
    model, data = output_dir / "sd15_sized", output_dir / "images"
    print(f"[throughput] building an SD1.5-sized pipeline ({cfg.latent_size}×{cfg.latent_size} latents) in {model}", flush=True)
    num_parameters = build_sd15_sized_pipeline(model, cfg.latent_size, cfg.unet_width)
    write_image_folder(data, 8 * cfg.latent_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = []
    for recipe in cfg.recipes:
        for variant in cfg.variants:
            for precision in cfg.precisions:
                for num_processes in cfg.num_processes:
                    row = {"recipe": recipe, "variant": variant, "precision": precision, "num_processes": num_processes}
                    fitting, comparison = fits(memory_estimate(recipe, variant, num_parameters), num_processes, device)
                    if not fitting:
                        row["skipped"] = comparison
                    else:
                        row.update(time_setting(cfg, recipe, variant, precision, model, data, num_processes))
                    settings.append(row)
                    print(f"[throughput] {row}", flush=True)
    shutil.rmtree(model)
    summary = {"command": command, "machine": machine(), "config": asdict(cfg), "unet_parameters": num_parameters,
               "settings": settings}
    (output_dir / "throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "throughput.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    command_main(ThroughputConfig, run, "throughput", argv)
