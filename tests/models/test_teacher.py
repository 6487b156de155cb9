"""The frozen teacher's text side: prompts encoded as the pipeline encodes them, quietly."""

from __future__ import annotations

import logging

import pytest
import torch

from stepdistill.evaluation.sampling import generate
from stepdistill.models import loading
from stepdistill.models.loading import PipelineError
from stepdistill.models.teacher import load_teacher


@pytest.mark.parametrize("resolution", [36, 20])
def test_a_resolution_the_pipeline_cannot_sample_is_refused_in_one_line(tiny_pipeline_dir, resolution):
    with pytest.raises(PipelineError, match=f"--resolution {resolution} is not a multiple of 8, which this "
                                            "StableDiffusionPipeline needs"):
        load_teacher(str(tiny_pipeline_dir), resolution=resolution)
    assert load_teacher(str(tiny_pipeline_dir), resolution=48).latent_shape == (4, 24, 24)


class Collector(logging.Handler):
    """Keeps the messages that reach a logger's handlers (the ones a user would see)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_over_long_prompts_are_cut_as_the_pipeline_cuts_them_with_one_notice_per_run(tiny_pipeline_dir, monkeypatch):
    monkeypatch.setattr(loading.TRUNCATION_NOTICE, "shown", False)  # as at the start of a run
    teacher = load_teacher(str(tiny_pipeline_dir))
    sources = [logging.getLogger(name) for name in (type(teacher.pipeline).__module__,
                                                    "transformers.tokenization_utils_base")]
    collector = Collector()
    for source in sources:
        monkeypatch.setattr(source, "handlers", [*source.handlers, collector])
    runaway = "a photo of the digit 3 " * 20_000  # a 460 kB line, far past the text encoder's length
    condition = teacher.encode_prompts([runaway, "the digit 3", runaway], batch_size=1)
    generate(teacher.pipeline, [runaway, runaway], num_inference_steps=1, guidance_scale=2.0)  # the pipeline's own path
    assert collector.messages == ["some prompts are longer than the text encoder takes: they are cut to fit, as the "
                                  "pipeline does (said once per run)"]
    expected, _ = teacher.pipeline.encode_prompt([runaway], device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    torch.testing.assert_close(condition["prompt_embeds"][2:], expected)  # the pipeline's own truncation
