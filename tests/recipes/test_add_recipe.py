"""The adversarial recipe's own paths: ADD with a local DINOv2 as its pixel network (a tiny random one, built
offline from a config), and its refusals."""

from __future__ import annotations

import json

import pytest
from transformers import Dinov2Config, Dinov2Model

from stepdistill.config import ConfigError

COMMON = dict(max_train_steps=2, train_batch_size=2, validation_steps=0, eval_num_samples=0, report_to="none",
              num_threads=1)


def test_add_reads_a_local_dinov2_at_its_own_image_size(add, tiny_pipeline_dir, tmp_path, monkeypatch):
    folder = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    seen = []
    original = add.discriminators.pixel_features

    def recorded(decode, network, layers, size=None):
        seen.append((type(network).__name__, layers, size))
        return original(decode, network, layers, size)

    monkeypatch.setattr(add.discriminators, "pixel_features", recorded)
    add.main(add.AddConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(tmp_path / "run"),
                           method="add", feature_network=str(folder), **COMMON))
    assert seen == [("Dinov2Model", ("encoder.layer.1", "encoder.layer.2", "encoder.layer.3"), 28)]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all("generator/distillation" in row for row in log)
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()


@pytest.mark.parametrize("flags, message", [
    ({"prompts_file": "README.md"}, "noises real images: give --train_data_dir"),
    ({"feature_network": "dinov2/"}, "--feature_network is ADD's pixel network"),
    ({"conditioning_timestep": 1000}, "--conditioning_timestep must be in \\[1, 999\\]"),
])
def test_bad_flags_are_refused_in_one_line(add, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        add.AddConfig(output_dir=str(tmp_path), **flags).validate()


def test_ladd_trains_a_patch_discriminator(add, tiny_pipeline_dir, tmp_path, monkeypatch):
    built, shapes = [], []
    original = add.Discriminator.for_features

    def recorded(features, condition_dim=None, per_location=False):
        built.append(original(features, condition_dim, per_location))
        built[-1].register_forward_hook(lambda module, inputs, logits: shapes.append(tuple(logits.shape)))
        return built[-1]

    monkeypatch.setattr(add.Discriminator, "for_features", recorded)
    add.main(add.AddConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(tmp_path / "run"),
                           discriminator_per_location=True, **COMMON))
    (discriminator,) = built
    assert shapes and all(len(shape) == 2 and shape[1] > 1 for shape in shapes)  # trained on logits per location
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all("critic/r1" in row for row in log)
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()
