"""The memory levers train: ``--gradient_checkpointing`` recomputes the trained networks' activations and
changes nothing else, ``--mixed_precision bf16`` runs their forward passes in bf16 on fp32 weights.

Two DMD2 steps on the tiny random-weight SD pipeline, with the GAN term on a few captioned images, so that
the discriminator's features are taken through the checkpointed and autocast networks too."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils.checkpoint
from PIL import Image

from stepdistill.models.loading import load_pipeline


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Four captioned 32 px images (diffusers' ImageFolder layout): real images for the GAN term."""
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {i}"}) + "\n")
    return folder


def run_dmd2(dmd2, teacher_dir, images, output_dir, monkeypatch, before_training=None, **flags):
    """Two DMD2 steps; the networks the recipe built (``before_training(nets)`` is called as they are built)."""
    build, built = dmd2.networks.build_networks, []

    def recorded_build(*args, **kwargs):
        built.append(build(*args, **kwargs))
        if before_training is not None:
            before_training(built[-1])
        return built[-1]

    monkeypatch.setattr(dmd2.networks, "build_networks", recorded_build)
    dmd2.main(dmd2.DMD2Config(
        pretrained_model_name_or_path=str(teacher_dir), train_data_dir=str(images), output_dir=str(output_dir),
        max_train_steps=2, train_batch_size=2, critic_steps_per_generator_step=1, validation_steps=0,
        eval_num_samples=0, report_to="none", num_threads=1, **flags,
    ))
    (nets,) = built
    return nets


def exported_student(output_dir, teacher_dir) -> dict[str, torch.Tensor]:
    """The exported student UNet's weights, checked finite, fp32 and moved away from the teacher's."""
    student = load_pipeline(output_dir / "student").unet.state_dict()
    teacher = load_pipeline(teacher_dir).unet.state_dict()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in student.values())
    changed = sum(not torch.equal(w, teacher[name]) for name, w in student.items())
    assert changed > len(student) // 2, f"only {changed} of {len(student)} student tensors moved"
    return student


def test_gradient_checkpointing_recomputes_and_trains_the_same_weights(dmd2, tiny_pipeline_dir, image_folder,
                                                                       tmp_path, monkeypatch):
    checkpoint, checkpointed = torch.utils.checkpoint.checkpoint, []

    def counted_checkpoint(function, *args, **kwargs):
        checkpointed.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted_checkpoint)
    nets = run_dmd2(dmd2, tiny_pipeline_dir, image_folder, tmp_path / "checkpointed", monkeypatch,
                    gradient_checkpointing=True)
    assert nets.student.network.is_gradient_checkpointing and nets.fake_score.network.is_gradient_checkpointing
    assert not nets.teacher.network.is_gradient_checkpointing  # frozen: nothing to recompute
    assert checkpointed, "no forward pass went through torch.utils.checkpoint"
    calls = len(checkpointed)
    run_dmd2(dmd2, tiny_pipeline_dir, image_folder, tmp_path / "plain", monkeypatch)
    assert len(checkpointed) == calls  # and none without the flag
    checkpointed_student = exported_student(tmp_path / "checkpointed", tiny_pipeline_dir)
    plain_student = exported_student(tmp_path / "plain", tiny_pipeline_dir)
    for name, weight in checkpointed_student.items():  # bit-identical on the CPU; 1e-6 is far below one step (3e-5)
        torch.testing.assert_close(weight, plain_student[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_autocasts_the_forward_passes_and_keeps_fp32_weights(dmd2, tiny_pipeline_dir, image_folder, tmp_path,
                                                                  monkeypatch, fresh_accelerator_state):
    dtypes: dict[str, set[torch.dtype]] = {"student": set(), "fake_score": set()}

    def watch(nets):
        for role in dtypes:
            getattr(nets, role).network.conv_out.register_forward_hook(
                lambda module, inputs, output, role=role: dtypes[role].add(output.dtype))

    nets = run_dmd2(dmd2, tiny_pipeline_dir, image_folder, tmp_path, monkeypatch, before_training=watch,
                    mixed_precision="bf16")
    assert dtypes == {"student": {torch.bfloat16}, "fake_score": {torch.bfloat16}}
    for network in (nets.student.network, nets.fake_score.network):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in network.parameters())
    exported_student(tmp_path, tiny_pipeline_dir)
