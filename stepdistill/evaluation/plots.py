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
    _reference_lines(axes, {teacher_label: teacher_fd, "real vs real": floor})
    ylabel = "FD-digits" if num_samples is None else f"FD-digits ({num_samples:,} samples)"
    axes.set(xlabel="training step", ylabel=ylabel, yscale="log")
    return _save(figure, axes, path)


def _reference_lines(axes, levels: dict[str, float | None]) -> None:
    for (name, level), style in zip(levels.items(), ("--", ":", "-.")):
        if level is not None:
            axes.axhline(level, linestyle=style, color="grey", label=name)


def _save(figure, axes, path: str | Path) -> Path:
    axes.legend(fontsize="small")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    pyplot.close(figure)
    return path


def plot_fd_against_sampling_steps(
    curves: dict[str, list[tuple[int, float]]], path: str | Path, levels: dict[str, float | None] | None = None
) -> Path:
    """FD-digits against sampling steps (log-log), one line per model, e.g.
    ``{"teacher, CFG 1.5": [(1, 0.74), (2, 0.36), ...], "dmd2": [...]}``, with horizontal ``levels``."""
    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        steps, fds = zip(*sorted(points))
        axes.plot(steps, fds, marker="o", label=name)
    _reference_lines(axes, levels or {})
    axes.set(xlabel="sampling steps", ylabel="FD-digits", xscale="log", yscale="log")
    return _save(figure, axes, path)


def plot_fd_during_training(
    curves: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str,
    levels: dict[str, float | None] | None = None,
) -> Path:
    """Validation FD-digits during training (log scale), one line per recipe: ``{"dmd2": [(x, fd), ...]}``
    with x in training steps or minutes (``xlabel`` says which)."""
    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        if points:
            xs, fds = zip(*points)
            axes.plot(xs, fds, marker="o", label=name)
    _reference_lines(axes, levels or {})
    axes.set(xlabel=xlabel, ylabel="FD-digits", yscale="log")
    return _save(figure, axes, path)


def side_by_side(images: dict[str, str | Path], path: str | Path, columns: int = 4) -> Path:
    """Image files (e.g. sample grids) in one figure, titled by their keys."""
    from PIL import Image

    rows = -(-len(images) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), dpi=100, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, image) in zip(axes.flat, images.items()):
        axis.imshow(Image.open(image))
        axis.set_title(title, fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    pyplot.close(figure)
    return path
