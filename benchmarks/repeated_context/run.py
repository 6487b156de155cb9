"""Time the shipped SD3 digits teacher's transformer with diffusers' own joint attention and with the
zero-T5 run computed once (``stepdistill.models.repeated_context``), side by side in one process.

    python benchmarks/repeated_context/run.py > benchmarks/repeated_context/results.md

Both load the same folder; one forward pass of 250 prompts' context at a mid-range timestep, and
one 8-step Euler sample of 250 images, each timed three times in alternation (the median printed),
and the largest difference between the two outputs.
"""

from __future__ import annotations

import statistics
import time

import torch
from diffusers import StableDiffusion3Pipeline

from stepdistill.assets import DIGITS_TEACHER_SD3
from stepdistill.bench import machine
from stepdistill.data.digits import evaluation_prompts
from stepdistill.models.loading import load_pipeline

BATCH, REPEATS, SAMPLE_STEPS = 250, 3, 8


def main() -> None:
    pipes = {"diffusers' attention": StableDiffusion3Pipeline.from_pretrained(
                 DIGITS_TEACHER_SD3, text_encoder_3=None, tokenizer_3=None),
             "repeated context once": load_pipeline(DIGITS_TEACHER_SD3)}
    prompts = evaluation_prompts(BATCH)
    reference = pipes["repeated context once"]
    context, _, pooled, _ = reference.encode_prompt(prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    latents = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((BATCH,), 500.0)
    times = {name: {"forward": [], "sample": []} for name in pipes}
    outputs = {}
    with torch.no_grad():
        for _ in range(REPEATS):
            for name, pipe in pipes.items():
                pipe.set_progress_bar_config(disable=True)
                began = time.perf_counter()
                outputs[name] = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                                                 pooled_projections=pooled).sample
                times[name]["forward"].append(time.perf_counter() - began)
                began = time.perf_counter()
                pipe(prompt=prompts, num_inference_steps=SAMPLE_STEPS, guidance_scale=1.0, latents=latents,
                     output_type="latent")
                times[name]["sample"].append(time.perf_counter() - began)
    m = machine()
    print(f"Measured {m['date']} on {m['cpu']} ({m['cpu_cores']} cores, {torch.get_num_threads()} threads), torch "
          f"{m['torch']}: the digits SD3 teacher, {BATCH} prompts, context of {context.shape[1]} tokens "
          f"(16 CLIP + 256 zeros), median of {REPEATS}.\n")
    print(f"| transformer attention | forward pass (s) | {SAMPLE_STEPS}-step sample (s) |")
    print("|---|---|---|")
    for name in pipes:
        print(f"| {name} | {statistics.median(times[name]['forward']):.3f} | {statistics.median(times[name]['sample']):.2f} |")
    slow, fast = (times[name] for name in pipes)
    print(f"\nspeed-up: forward {statistics.median(slow['forward']) / statistics.median(fast['forward']):.1f}×, "
          f"sample {statistics.median(slow['sample']) / statistics.median(fast['sample']):.1f}×; largest output "
          f"difference {(outputs[next(iter(pipes))] - outputs['repeated context once']).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
