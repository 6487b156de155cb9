"""Streamed training data through the shipped teacher: every layout, the cache and the DataLoader's workers give
the batches the in-memory path gives; a cache from elsewhere and unreadable images are handled as flagged."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from digits_layouts import quantised_digits, write_layouts
from stepdistill import conditioning
from stepdistill.assets import DIGITS_TEACHER
from stepdistill.config import ConfigError
from stepdistill.data import sources
from stepdistill.data.cache import CachedExamples
from stepdistill.data.loader import TrainingExamples
from stepdistill.data.order import EpochOrder
from stepdistill.models.teacher import load_teacher
from stepdistill.precompute import CacheConfig, write_cache
from stepdistill.run.data import BatchStream, open_cache

COUNT, BATCH = 20, 8
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(str(DIGITS_TEACHER))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_layouts(tmp_path_factory.mktemp("layouts"), COUNT)


def first_batches(stream: BatchStream, count: int = 3) -> list:
    return [stream() for _ in range(count)]


def positions(count: int = 3) -> list[list[int]]:
    """The examples a stream of this size reads in its first batches (its order, alone)."""
    batches = iter(EpochOrder(COUNT, BATCH, seed=0))
    return [[index for index, _ in next(batches)] for _ in range(count)]


@pytest.mark.parametrize("layout", ["imagefolder", "datasets", "parquet", "tar"])
def test_every_layout_gives_the_in_memory_batches(teacher, layouts, layout):
    stream = BatchStream(TrainingExamples(sources.open_source(layouts[layout]), 32), teacher, BATCH, seed=0, device=CPU)
    images, captions = quantised_digits(COUNT)
    for batch, indices in zip(first_batches(stream), positions()):  # three batches: across the epoch's end
        assert torch.equal(batch.real_latents, teacher.encode_images(images[indices]))
        expected = teacher.encode_prompts([captions[i] for i in indices])
        assert all(torch.equal(batch.condition[name], expected[name]) for name in expected)
        assert conditioning.batch_size(batch.unconditional) == BATCH


def test_workers_read_the_same_batches(teacher, layouts):
    examples = TrainingExamples(sources.open_source(layouts["tar"]), 32, center_crop=False, random_flip=True, seed=4)
    alone = first_batches(BatchStream(examples, teacher, BATCH, seed=0, device=CPU))
    with_workers = first_batches(BatchStream(examples, teacher, BATCH, seed=0, device=CPU, num_workers=2))
    assert all(torch.equal(a.real_latents, b.real_latents) for a, b in zip(alone, with_workers))


def test_a_cache_gives_the_batches_encoded_on_the_fly(teacher, layouts, tmp_path):
    manifest = write_cache(CacheConfig(train_data_dir=layouts["imagefolder"], output_dir=str(tmp_path), batch_size=6,
                                       shard_size=7))
    assert manifest["count"] == COUNT and manifest["entries"] == ["prompt_embeds"]
    cached = BatchStream(open_cache(SimpleNamespace(cache_dir=str(tmp_path), center_crop=True), teacher), teacher,
                         BATCH, seed=0, device=CPU)
    fly = BatchStream(TrainingExamples(sources.open_source(layouts["imagefolder"]), 32), teacher, BATCH, seed=0,
                      device=CPU)
    for a, b in zip(first_batches(cached), first_batches(fly)):
        torch.testing.assert_close(a.real_latents, b.real_latents, rtol=0, atol=1e-5)  # the VAE's batch-size numerics
        assert torch.equal(a.condition["prompt_embeds"], b.condition["prompt_embeds"])


def test_a_cache_made_otherwise_is_refused_in_one_line(teacher, layouts, tmp_path, tiny_pipeline_dir):
    write_cache(CacheConfig(train_data_dir=layouts["imagefolder"], output_dir=str(tmp_path)))
    flags = SimpleNamespace(cache_dir=str(tmp_path), center_crop=True)
    with pytest.raises(ConfigError, match="made at 32 px, this run is at 64 px: pass --resolution 32"):
        open_cache(flags, load_teacher(str(DIGITS_TEACHER), resolution=64))
    with pytest.raises(ConfigError, match="made with another teacher \\(text_encoder, vae differ"):
        open_cache(flags, load_teacher(str(tiny_pipeline_dir)))
    with pytest.raises(ConfigError, match="made with --center_crop True"):
        open_cache(SimpleNamespace(cache_dir=str(tmp_path), center_crop=False), teacher)
    assert isinstance(open_cache(flags, teacher), CachedExamples)


def test_skipped_images_are_logged_by_name_and_leave_smaller_batches(teacher, layouts, tmp_path, caplog):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for path in Path(layouts["imagefolder"]).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "00003.png").write_text("not a png")
    stream = BatchStream(TrainingExamples(sources.open_source(str(folder)), 32, on_bad_image="skip"), teacher,
                         COUNT, seed=0, device=CPU)
    with caplog.at_level(logging.WARNING, logger="stepdistill"):
        batch = stream()
    assert batch.size == COUNT - 1 and conditioning.batch_size(batch.unconditional) == COUNT - 1
    assert any(f"cannot read the image {folder / '00003.png'}" in r.message and "1 unreadable images skipped so far"
               in r.message for r in caplog.records)
