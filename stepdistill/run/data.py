"""Users' data as training batches: a DataLoader over a resumable shuffled order, encoded by the teacher
on the fly, or read from a cache that ``python -m stepdistill cache`` wrote.

The embedded digits stay in memory (:func:`stepdistill.run.setup.in_memory_batches`); everything
given by ``--train_data_dir``, ``--prompts_file`` or ``--cache_dir`` streams through here in constant memory.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from stepdistill import conditioning
from stepdistill.config import ConfigError
from stepdistill.data import cache, sources
from stepdistill.data.loader import TrainingExamples, collate
from stepdistill.data.order import EpochOrder
from stepdistill.methods.base import Batch
from stepdistill.models.teacher import Teacher
from stepdistill.run.flags import RunConfig

logger = logging.getLogger(__name__)

SAMPLED_PROMPTS = 1024  # training prompts kept in memory for validation grids and DMD's regression pairs


def cache_description(teacher: Teacher, center_crop: bool) -> dict:
    """What a cache's contents depend on: the encoders' fingerprints, the resolution and the crop."""
    return {"encoders": teacher.encoder_fingerprints(), "resolution": teacher.resolution, "center_crop": center_crop,
            "pipeline": type(teacher.pipeline).__name__}


def open_cache(cfg: RunConfig, teacher: Teacher) -> cache.CachedExamples:
    """The cache ``--cache_dir`` names, refused in one line when another teacher, resolution or crop made it."""
    examples = cache.CachedExamples(cfg.cache_dir)
    made, now = examples.manifest["description"], cache_description(teacher, cfg.center_crop)
    if made["resolution"] != now["resolution"]:
        raise ConfigError(f"--cache_dir {cfg.cache_dir} was made at {made['resolution']} px, this run is at "
                          f"{now['resolution']} px: pass --resolution {made['resolution']} or cache again")
    if made["encoders"] != now["encoders"]:
        other = sorted(name for name in now["encoders"] if made["encoders"].get(name) != now["encoders"][name])
        raise ConfigError(f"--cache_dir {cfg.cache_dir} was made with another teacher ({', '.join(other)} differ "
                          f"from --pretrained_model_name_or_path's): cache again with this teacher")
    if made["center_crop"] != now["center_crop"]:
        raise ConfigError(f"--cache_dir {cfg.cache_dir} was made with --center_crop {made['center_crop']}: pass it, "
                          "or cache again")
    return examples


def training_examples(cfg: RunConfig, teacher: Teacher) -> tuple[TrainingExamples | cache.CachedExamples, bool]:
    """The loader's dataset for the run's data and whether it has images; logs what was opened."""
    if cfg.cache_dir:
        examples = open_cache(cfg, teacher)
        logger.info(f"training data: {len(examples):,} cached examples in {cfg.cache_dir}")
        return examples, examples.manifest["has_images"]
    source = sources.open_source(cfg.train_data_dir, cfg.prompts_file, cfg.image_column, cfg.caption_column)
    logger.info(f"training data: {source}")
    examples = TrainingExamples(source, teacher.resolution, cfg.center_crop, cfg.random_flip, cfg.seed,
                                cfg.on_bad_image)
    return examples, source.has_images


def sampled_prompts(examples: TrainingExamples | cache.CachedExamples, count: int = SAMPLED_PROMPTS) -> list[str]:
    """Up to ``count`` training captions spread evenly over the data (all of them, in order, when fewer)."""
    step = max(1, len(examples) // count)
    return [examples.caption(index) for index in range(0, len(examples), step)][:count]


class BatchStream:
    """``next_batch()`` over streamed data: batches of ``batch_size`` from a :class:`DataLoader`
    (``num_workers`` reading ahead) in the resumable :class:`EpochOrder` of this process, their
    captions text-encoded and images VAE-encoded by the teacher unless a cache holds both.

    :meth:`state_dict` is the data position the trainer keeps in every checkpoint."""

    def __init__(self, examples: Dataset, teacher: Teacher, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, num_processes: int = 1, num_workers: int = 0) -> None:
        self.examples, self.teacher, self.device, self.num_workers = examples, teacher, device, num_workers
        self.order = EpochOrder(len(examples), batch_size, seed, rank, num_processes)
        self.unconditional = conditioning.to(teacher.encode_unconditional(), device)
        self.batches = None
        self.skipped = 0

    def _raw_batches(self):
        # Its own generator: a loader draws its workers' base seed when it starts, which from torch's global
        # generator would shift every later draw of a resumed run (its loader starts again) off the uninterrupted one's.
        loader = DataLoader(self.examples, batch_sampler=self.order, num_workers=self.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(self.order.seed))
        return iter(loader)

    def __call__(self) -> Batch:
        if self.batches is None:
            self.batches = self._raw_batches()
        raw = next(self.batches)
        self.order.advance()
        for reason in raw["skipped"]:
            self.skipped += 1
            logger.warning(f"skipped: {reason} ({self.skipped} unreadable images skipped so far)")
        if not raw["captions"]:  # every image of the batch was unreadable: take the next one
            return self()
        condition = raw.get("condition") or self.teacher.encode_prompts(raw["captions"])
        latents = raw.get("latents")
        if latents is None and "images" in raw:  # contiguous, as a cache's rows are: randn_like draws by layout
            latents = self.teacher.encode_images(raw["images"]).contiguous()
        size = len(raw["captions"])
        return Batch(condition=conditioning.to(condition, self.device),
                     unconditional=conditioning.expand(self.unconditional, size),
                     real_latents=latents.to(self.device) if latents is not None else None)

    def state_dict(self) -> dict:
        return {"examples_read": self.order.examples_read, "batch_size": self.order.batch_size,
                "num_processes": self.order.num_processes, "examples": self.order.size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; ``ValueError`` when the run reads its data otherwise now
        (another batch size, number of processes or dataset size)."""
        now = self.state_dict()
        changed = [f"{key} {state[key]} → {now[key]}" for key in ("batch_size", "num_processes", "examples")
                   if state.get(key) != now[key]]
        if changed:
            raise ValueError(f"the checkpoint read its data otherwise ({', '.join(changed)}), so its data position "
                             "does not apply")
        self.order.examples_read = state["examples_read"]
        self.batches = None


def batch_stream(cfg: RunConfig, teacher: Teacher, accelerator: Accelerator) -> tuple[list[str], BatchStream, bool]:
    """Sampled training prompts, the batch stream of this process and whether the data has images."""
    examples, has_images = training_examples(cfg, teacher)
    stream = BatchStream(examples, teacher, cfg.train_batch_size, cfg.seed, accelerator.device,
                         accelerator.process_index, accelerator.num_processes, cfg.dataloader_num_workers)
    return sampled_prompts(examples), stream, has_images
