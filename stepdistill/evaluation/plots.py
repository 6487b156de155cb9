"""Plots of a run: the student's validation FD-digits against training steps (and time)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot  # noqa: E402


def validation_curve(train_log: str | Path) -> list[tuple[int, float, float]]:
    """``(step, seconds, fd_digits)`` of every validation row of a ``train_log.jsonl``."""
    rows = [json.loads(line) for line in Path(train_log).read_text().splitlines() if line.strip()]
    return [(r["step"], r["seconds"], r["validation/fd_digits"]) for r in rows if "validation/fd_digits" in r]


def plot_validation_curve(
    train_log: str | Path, path: str | Path, teacher_fd: float | None = None, floor: float | None = None,
    label: str = "student", teacher_label: str = "teacher", num_samples: int | None = None,
) -> Path | None:
    """FD-digits of the validated student against training steps, log scale (an exponential drop is a
    straight line), with the teacher's and the real-vs-real levels when given; ``None`` without validations."""
    curve = validation_curve(train_log)
    if not curve:
        return None
    steps, _, fds = zip(*curve)
    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    axes.plot(steps, fds, marker="o", label=label)
    for level, name, style in ((teacher_fd, teacher_label, "--"), (floor, "real vs real", ":")):
        if level is not None:
            axes.axhline(level, linestyle=style, color="grey", label=name)
    ylabel = "FD-digits" if num_samples is None else f"FD-digits ({num_samples:,} samples)"
    axes.set(xlabel="training step", ylabel=ylabel, yscale="log")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    pyplot.close(figure)
    return path
