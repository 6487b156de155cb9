"""Every recipe on every backbone: two training steps on a tiny random-weight pipeline of each family,
then the export (full and LoRA) reloads in its own diffusers pipeline and samples finite images.

Backbones: SD 1.x (ε), SD 1.x (v-prediction), SDXL, SD3 without T5, FLUX.1-dev-style Flux. Progressive
distillation's students predict v on every DDPM-family teacher. The adversarial recipe runs as LADD (its
heads on each backbone's own blocks) and as ADD (a pixel discriminator on the decoded images).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from stepdistill import export
from stepdistill.evaluation.sampling import generate

PROMPTS = ["a handwritten digit three", "a handwritten digit eight", "a handwritten digit one"]
MATRIX_BACKBONES = ("sd", "sd_v", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prompts file and a captioned image folder (32 px)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    with open(images / "metadata.jsonl", "w") as metadata:
        for i, prompt in enumerate(PROMPTS):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(images / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": prompt}) + "\n")
    return folder


def recipe_config(recipe, name, teacher_dir, output_dir, data, use_lora):
    common = dict(pretrained_model_name_or_path=str(teacher_dir), output_dir=str(output_dir), max_train_steps=2,
                  train_batch_size=2, validation_steps=0, eval_num_samples=0, use_lora=use_lora, resolution=32,
                  report_to="none", guidance_scale=2.0)
    if name == "consistency":
        return recipe.ConsistencyConfig(**common, train_data_dir=str(data / "images"), num_student_steps=2)
    if name == "dmd2":  # the GAN term on real images; the others run data-free on prompts
        return recipe.DMD2Config(**common, train_data_dir=str(data / "images"), critic_steps_per_generator_step=1)
    if name in ("ladd", "add"):  # the adversarial recipe's two methods, on real images
        return recipe.AddConfig(**common, train_data_dir=str(data / "images"), method=name, num_student_steps=2,
                                critic_steps_per_generator_step=1)
    if name == "progressive":  # two stages of one step: guidance distillation, then 2 → 1 steps
        return recipe.ProgressiveConfig(**{**common, "max_train_steps": 1}, train_data_dir=str(data / "images"),
                                        start_steps=2, num_student_steps=1)
    return recipe.SiDConfig(**common, prompts_file=str(data / "prompts.txt"), num_student_steps=2)


def exported_scheduler(name: str, backbone: str) -> str:
    flow = backbone in ("sd3", "flux")
    if name == "progressive":  # deterministic DDIM steps (the Euler step on a flow)
        return "FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler"
    return "FlowMatchLCMScheduler" if flow else "LCMScheduler"


# ADD's pixel discriminator reads decoded images, the same on every backbone: SD 1.x, SDXL and SD3 cover it
RECIPE_BACKBONES = [(name, backbone) for name in ("dmd2", "consistency", "sid", "progressive", "ladd", "add")
                    for backbone in MATRIX_BACKBONES if not (name == "add" and backbone in ("sd_v", "flux"))]


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name, backbone", RECIPE_BACKBONES)
def test_recipe_trains_and_exports_on_every_backbone(request, backbone_dirs, data, tmp_path, name, backbone, use_lora):
    recipe = request.getfixturevalue("add" if name in ("ladd", "add") else name)
    recipe.main(recipe_config(recipe, name, backbone_dirs[backbone], tmp_path, data, use_lora))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["generator/loss"])) for row in log)
    student_dir = tmp_path / "student"
    metadata = json.loads((student_dir / export.STUDENT_METADATA).read_text())
    assert metadata["format"] == ("lora" if use_lora else "full")
    pipe, guidance_scale = export.load_student(student_dir, str(backbone_dirs[backbone]))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == metadata["scheduler"]
    assert metadata["scheduler"] == exported_scheduler(name, backbone)
    if backbone == "sd_v" or (name == "progressive" and backbone in ("sd", "sdxl")):  # the student predicts v
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    images, _ = generate(pipe, PROMPTS[:2], metadata["num_inference_steps"], guidance_scale, resolution=32)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_flux_without_guidance_input_refuses_cfg_before_writing(dmd2, tmp_path, data):
    from stepdistill.config import ConfigError
    from stepdistill.models import tiny_pipelines

    tiny_pipelines.build_flux(tmp_path / "schnell", seed=0, guidance_embeds=False)
    cfg = recipe_config(dmd2, "dmd2", tmp_path / "schnell", tmp_path / "out", data, use_lora=False)
    with pytest.raises(ConfigError, match="--guidance_scale 1"):
        dmd2.main(cfg)
    assert not (tmp_path / "out").exists()


def test_unet_only_options_are_refused_on_a_transformer_before_writing(sid, consistency, backbone_dirs, tmp_path, data):
    from stepdistill.config import ConfigError

    cfg = recipe_config(sid, "sid", backbone_dirs["sd3"], tmp_path / "sid", data, use_lora=False)
    cfg.per_step_fake_score = True
    with pytest.raises(ConfigError, match="--per_step_fake_score needs a UNet teacher"):
        sid.main(cfg)
    cfg = recipe_config(consistency, "consistency", backbone_dirs["flux"], tmp_path / "lcm", data, use_lora=False)
    cfg.guidance_embedding = True
    with pytest.raises(ConfigError, match="--guidance_embedding needs a UNet teacher"):
        consistency.main(cfg)
    assert not (tmp_path / "sid").exists() and not (tmp_path / "lcm").exists()
