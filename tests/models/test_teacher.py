"""The frozen teacher's text side: prompts encoded as the pipeline encodes them, quietly."""

from __future__ import annotations

import logging

import pytest
import torch

from stepdistill.models.loading import PipelineError
from stepdistill.models.teacher import load_teacher


@pytest.mark.parametrize("resolution", [36, 20])
def test_a_resolution_the_pipeline_cannot_sample_is_refused_in_one_line(tiny_pipeline_dir, resolution):
    with pytest.raises(PipelineError, match=f"--resolution {resolution} is not a multiple of 8, which this "
                                            "StableDiffusionPipeline needs"):
        load_teacher(str(tiny_pipeline_dir), resolution=resolution)
    assert load_teacher(str(tiny_pipeline_dir), resolution=48).latent_shape == (4, 24, 24)


def test_over_long_prompts_are_cut_as_the_pipeline_cuts_them_with_one_warning_line(tiny_pipeline_dir, caplog, capfd):
    teacher = load_teacher(str(tiny_pipeline_dir))
    runaway = "a photo of the digit 3 " * 20_000  # a 460 kB line, far past the text encoder's length
    with caplog.at_level(logging.WARNING):
        condition = teacher.encode_prompts([runaway, "the digit 3", runaway], batch_size=1)
    shown = capfd.readouterr().err + caplog.text
    assert "a photo of the digit 3 a photo" not in shown and "Token indices" not in shown
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "were cut to fit" in warnings[0]
    expected, _ = teacher.pipeline.encode_prompt([runaway], device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    torch.testing.assert_close(condition["prompt_embeds"][2:], expected)  # the pipeline's own truncation
