"""``python -m stepdistill cache``: encode a dataset's images (VAE latents) and captions (every entry of
the backbone's condition) once, into sharded safetensors files that recipes read with ``--cache_dir``.

    python -m stepdistill cache --pretrained_model_name_or_path PATH --train_data_dir images/ --output_dir cache/
    accelerate launch recipes/dmd2.py --pretrained_model_name_or_path PATH --cache_dir cache/

The manifest records the encoders' fingerprints, the resolution and the crop; a recipe refuses a cache
made with another teacher, resolution or crop. Latents are the VAE's posterior means, so a cached run
trains on the same numbers as one encoding on the fly (random flips need the images: not cached).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stepdistill import config as configs
from stepdistill.config import ConfigError, field
from stepdistill.data import sources
from stepdistill.data.cache import CacheWriter
from stepdistill.data.loader import TrainingExamples, collate
from stepdistill.data.prompts import DataError
from stepdistill.models.loading import PipelineError
from stepdistill.models.teacher import load_teacher
from stepdistill.run.data import cache_description
from stepdistill.run.flags import TeacherDataConfig

logger = logging.getLogger(__name__)


@dataclass
class CacheConfig(TeacherDataConfig):
    """Precompute VAE latents and text-encoder outputs of --train_data_dir or --prompts_file for --cache_dir."""

    output_dir: str = field("cache", "the cache folder (shards and manifest.json)")
    batch_size: int = field(64, "examples encoded at once", at_least=1)
    shard_size: int = field(4096, "examples per safetensors shard", at_least=1)
    num_threads: int = field(0, "CPU threads for torch (0: all cores)", at_least=0)

    def validate(self) -> None:
        self.validate_data()
        if not (self.train_data_dir or self.prompts_file):
            raise ConfigError("give --train_data_dir or --prompts_file: the data to cache")
        configs.require_writable_dir(self.output_dir, "--output_dir")


def write_cache(cfg: CacheConfig) -> dict:
    """Encode every example in the data's own order and write the cache; its manifest."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    teacher = load_teacher(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.resolution)
    source = sources.open_source(cfg.train_data_dir, cfg.prompts_file, cfg.image_column, cfg.caption_column)
    examples = TrainingExamples(source, teacher.resolution, cfg.center_crop, on_bad_image=cfg.on_bad_image)
    order = [[(index, index) for index in range(start, min(start + cfg.batch_size, len(examples)))]
             for start in range(0, len(examples), cfg.batch_size)]
    loader = DataLoader(examples, batch_sampler=order, num_workers=cfg.dataloader_num_workers, collate_fn=collate)
    writer = CacheWriter(cfg.output_dir, cache_description(teacher, cfg.center_crop), cfg.shard_size)
    skipped = 0
    for batch in tqdm(loader, desc="caching", unit="batch"):
        for reason in batch["skipped"]:
            skipped += 1
            logger.warning(f"skipped: {reason} ({skipped} unreadable images skipped so far)")
        if batch["captions"]:
            latents = teacher.encode_images(batch["images"]) if "images" in batch else None
            writer.add(batch["captions"], latents, teacher.encode_prompts(batch["captions"]))
    return writer.close()


def main(argv: list[str] | None = None) -> None:
    cfg = configs.parse(CacheConfig, argv, prog="python -m stepdistill cache")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stepdistill").setLevel(logging.INFO)
    began = time.perf_counter()
    try:
        manifest = write_cache(cfg)
    except (ConfigError, PipelineError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"cached {manifest['count']:,} examples ({', '.join(['latents'] * manifest['has_images'] + manifest['entries'])}) "
          f"in {len(manifest['shards'])} shards at {cfg.output_dir} ({time.perf_counter() - began:.0f} s)")
