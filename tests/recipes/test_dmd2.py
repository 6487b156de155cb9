"""recipes/dmd2.py end to end on a tiny random-weight SD pipeline: the code path a hub model takes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from stepdistill import config as configs
from stepdistill.config import ConfigError
from stepdistill.data import digits
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.report import Scorers, evaluate
from stepdistill.models.loading import PipelineError, load_pipeline
from stepdistill.models.teacher import load_teacher


def smoke_config(dmd2, teacher_dir, output_dir, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(teacher_dir), output_dir=str(output_dir), max_train_steps=2,
        train_batch_size=2, critic_steps_per_generator_step=2, eval_num_samples=10, teacher_eval_steps=2,
    )
    values.update(overrides)
    return dmd2.DMD2Config(**values)


@pytest.mark.parametrize("use_lora", [False, True])
def test_two_steps_then_export_and_report(dmd2, tiny_pipeline_dir, tmp_path, use_lora, shipped_classifier):
    cfg = smoke_config(dmd2, tiny_pipeline_dir, tmp_path, use_lora=use_lora, validation_steps=2, num_validation_images=10)
    dmd2.main(cfg)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all("critic/gan_critic" in row and "generator/dmd" in row for row in log)
    assert "validation/fd_digits" in log[1] and (tmp_path / "validation" / "step-2.png").is_file()
    assert (tmp_path / "validation_curve.png").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    models = {(r["model"], r["num_inference_steps"]) for r in report["results"]}
    assert models == {("student", 1), ("teacher", 2)}
    teacher_row = next(r for r in report["results"] if r["model"] == "teacher")
    fresh_teacher = load_pipeline(tiny_pipeline_dir)  # the teacher row scores the teacher, not a student adapter
    fresh_teacher.set_progress_bar_config(disable=True)
    expected = evaluate(fresh_teacher, "teacher", (2,), (cfg.guidance_scale,), digits.evaluation_prompts(10),
                        Scorers(digits=DigitsEvaluator()), seed=cfg.seed)[0]
    assert teacher_row["fd_digits"] == pytest.approx(expected.fd_digits, rel=1e-5)
    student = tmp_path / "student"
    assert json.loads((student / "stepdistill_student.json").read_text())["timesteps"] == [625]  # the default t0
    if use_lora:
        assert (student / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert type(load_pipeline(student).scheduler).__name__ == "LCMScheduler"


@pytest.mark.parametrize("per_step_fake_score", [False, True])
def test_multi_step_student_with_backward_simulation(dmd2, tiny_pipeline_dir, tmp_path, shipped_classifier,
                                                     per_step_fake_score):
    cfg = smoke_config(dmd2, tiny_pipeline_dir, tmp_path, num_student_steps=2, gan_generator_weight=0.0,
                       gan_critic_weight=0.0, checkpointing_steps=1, conditioning_timestep=999,
                       per_step_fake_score=per_step_fake_score)
    dmd2.main(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["model"], r["num_inference_steps"]) for r in report["results"]} >= {("student", 1), ("student", 2)}
    assert json.loads((tmp_path / "student" / "stepdistill_student.json").read_text())["timesteps"] == [999, 499]
    # resume from the last checkpoint and train two more steps
    resumed = smoke_config(dmd2, tiny_pipeline_dir, tmp_path, num_student_steps=2, gan_generator_weight=0.0,
                           gan_critic_weight=0.0, max_train_steps=4, resume_from_checkpoint="latest",
                           conditioning_timestep=999, per_step_fake_score=per_step_fake_score)
    dmd2.main(resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_regression_pairs_are_the_teachers_ode_solutions_from_their_noise(dmd2, tiny_pipeline_dir, tmp_path):
    # each (noise, condition, target): the teacher pipeline's own 50-step guided DDIM sample, asked for by the
    # prompt's text, from that noise, is the target (DMD eq. 9's pairs)
    teacher = load_teacher(str(tiny_pipeline_dir))
    teacher.pipeline.set_progress_bar_config(disable=True)
    prompts = ["a handwritten digit one", "a handwritten digit two"]
    cfg = smoke_config(dmd2, tiny_pipeline_dir, tmp_path, num_regression_pairs=3, guidance_scale=2.0)
    torch.manual_seed(0)
    noise, condition, target = dmd2.regression_pairs(teacher, prompts, cfg)
    assert noise.shape == target.shape == (3, *teacher.latent_shape)
    encoded = teacher.encode_prompts(prompts)["prompt_embeds"]
    for i in range(3):
        (prompt,) = [p for p, e in zip(prompts, encoded) if torch.equal(condition["prompt_embeds"][i], e)]
        sample = teacher.pipeline(prompt=[prompt], latents=noise[i : i + 1], num_inference_steps=50, guidance_scale=2.0,
                                  output_type="latent").images
        torch.testing.assert_close(target[i : i + 1], sample, rtol=1e-5, atol=1e-5)


def test_the_regression_term_trains_in_the_recipe(dmd2, tiny_pipeline_dir, tmp_path):
    cfg = smoke_config(dmd2, tiny_pipeline_dir, tmp_path, regression_weight=0.5, num_regression_pairs=4,
                       gan_generator_weight=0.0, gan_critic_weight=0.0, critic_steps_per_generator_step=1,
                       eval_num_samples=0, validation_steps=0, report_to="none", num_threads=1)
    dmd2.main(cfg)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    for row in log:
        assert row["generator/regression"] > 0 and row["generator/loss"] == pytest.approx(
            row["generator/dmd"] + 0.5 * row["generator/regression"], rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_student_steps", "0"], "--num_student_steps must be ≥ 1"),
        (["--resume_from_checkpoint", "nowhere/checkpoint-9"], "no checkpoint folder nowhere/checkpoint-9"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--prompts_file", "missing.txt"], "--prompts_file missing.txt does not exist"),
        (["--ema_decay", "1.5"], "--ema_decay"),
        (["--report_to", "stdout"], "--report_to must be one of"),
        (["--report_to", "wandb"], "not installed"),
        (["--validation_steps", "-5"], "--validation_steps must be ≥ 0"),
        (["--output_dir", "README.md"], "--output_dir README.md is a file"),
        (["--num_student_steps", "51"], "--num_student_steps must be ≤ 50"),
        (["--eval_num_samples", "1"], "--eval_num_samples must be 0"),
        (["--use_lora", "true", "--gradient_checkpointing", "true"], "--gradient_checkpointing needs full weights"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU"),
        (["--prompts_file", "a.txt", "--train_data_dir", "b"], "not both"),
        (["--train_data_dir", "tests"], "none of the data layouts: a folder with metadata.jsonl"),
        (["--random_flip", "true", "--dataloader_num_workers", "2"], "--random_flip, --dataloader_num_workers: for streamed data"),
        (["--guidance_scale", "-1"], "--guidance_scale must be ≥ 0"),
        (["--critic_learning_rate=-1e-4"], "--critic_learning_rate must be > 0"),
        (["--train_batch_size", "0"], "--train_batch_size must be ≥ 1"),
        (["--max_train_steps", "ten"], "invalid"),
        (["--use_lora", "maybe"], "expected true/false"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
        (["--lr_scheduler", "exponential"], "--lr_scheduler must be one of"),
        (["--max_consecutive_skips", "0"], "--max_consecutive_skips must be ≥ 1"),
        (["--conditioning_timestep", "0"], "--conditioning_timestep must be in [1, 999]"),
        (["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
        (["--prompts_file", "README.md"], "the GAN term needs real images"),
        (["--gan_max_timestep", "1000"], "--gan_max_timestep must be ≤ 999"),
        (["--timestep_sampling", "logit_normal"], "are for flow-matching teachers (SD3, Flux)"),
        (["--timestep_shift", "3"], "this teacher's scheduler is DDIMScheduler"),
        (["--timestep_sampling", "beta"], "--timestep_sampling must be one of uniform, logit_normal"),
        (["--logit_std", "2"], "the sampling is uniform"),
        (["--resolution", "4"], "--resolution must be ≥ 8"),
    ],
)
def test_bad_flags_fail_before_loading(dmd2, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(dmd2.DMD2Config, flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_diverged_run_stops_with_one_message_and_keeps_its_checkpoint(
    dmd2, tiny_pipeline_dir, tmp_path, monkeypatch, capsys
):
    def nan_generator_loss(self, batch):
        losses = healthy_generator_loss(self, batch)
        return {**losses, "loss": losses["loss"] * float("nan")}

    healthy_generator_loss = dmd2.methods.DMD2.generator_loss
    monkeypatch.setattr(dmd2.methods.DMD2, "generator_loss", nan_generator_loss)
    flags = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--output_dir", str(tmp_path), "--max_train_steps",
             "6", "--train_batch_size", "2", "--critic_steps_per_generator_step", "1", "--checkpointing_steps", "1",
             "--max_consecutive_skips", "3", "--validation_steps", "0"]
    monkeypatch.setattr("sys.argv", ["recipes/dmd2.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        dmd2.run.command_line(dmd2.DMD2Config, dmd2.main, prog="recipes/dmd2.py")
    message = str(exit_info.value.code)
    assert message.startswith("error: 3 generator updates in a row had a non-finite loss (step 3)")
    assert "the last good checkpoint is" in message and "checkpoint-2" in message
    assert "resume with --resume_from_checkpoint latest" in message
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "student").exists()  # nothing exported from a diverged run


def test_latest_passes_over_a_damaged_checkpoint_with_one_warning(dmd2, tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                   caplog):
    flags = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--output_dir", str(tmp_path), "--train_batch_size",
             "2", "--checkpointing_steps", "2", "--validation_steps", "0", "--eval_num_samples", "0", "--num_threads", "1"]
    dmd2.main(configs.parse(dmd2.DMD2Config, [*flags, "--max_train_steps", "4"]))
    weights = next((tmp_path / "checkpoint-4").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as by a full disk
    (tmp_path / "train_log.jsonl").unlink()
    monkeypatch.setattr("sys.argv", ["recipes/dmd2.py", *flags, "--max_train_steps", "5",
                                     "--resume_from_checkpoint", "latest"])
    with caplog.at_level("INFO"):
        dmd2.run.command_line(dmd2.DMD2Config, dmd2.main, prog="recipes/dmd2.py")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping damaged checkpoint {tmp_path / 'checkpoint-4'}")
    assert f"resumed from {tmp_path / 'checkpoint-2'} at step 2" in caplog.text
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [3, 4, 5]


def test_latest_with_every_checkpoint_damaged_fails_before_loading(dmd2, tmp_path, capsys):
    (tmp_path / "checkpoint-3").mkdir()  # no manifest: cut short before it was complete
    with pytest.raises(SystemExit):
        configs.parse(dmd2.DMD2Config, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert f"every checkpoint in {tmp_path} is damaged" in capsys.readouterr().err


def test_unreadable_data_ends_in_one_line_naming_the_file(dmd2, tiny_pipeline_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"the digit 1\n\xff\xfe binary\n")
    monkeypatch.setattr("sys.argv", ["recipes/dmd2.py", "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                                     "--prompts_file", str(prompts), "--gan_generator_weight", "0",
                                     "--gan_critic_weight", "0", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        dmd2.run.command_line(dmd2.DMD2Config, dmd2.main, prog="recipes/dmd2.py")
    assert exit_info.value.code == f"error: {prompts}:2 is not UTF-8 text (byte 0xff)"
    assert not (tmp_path / "out").exists()


def test_fp16_on_the_cpu_is_refused_not_run_as_fp32(dmd2, tiny_pipeline_dir, tmp_path, monkeypatch,
                                                    fresh_accelerator_state):
    with pytest.raises(ConfigError, match="--mixed_precision fp16 needs a CUDA GPU"):
        dmd2.main(smoke_config(dmd2, tiny_pipeline_dir, tmp_path / "out", mixed_precision="fp16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as `accelerate launch --mixed_precision fp16` sets it
    with pytest.raises(ConfigError, match="--mixed_precision fp16 needs a CUDA GPU"):
        dmd2.main(smoke_config(dmd2, tiny_pipeline_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_teachers_are_refused_before_training(dmd2, tmp_path):
    with pytest.raises(ConfigError, match="--pretrained_model_name_or_path: no pipeline at"):
        dmd2.main(smoke_config(dmd2, tmp_path / "missing", tmp_path / "out"))
    unconditional = tmp_path / "ddpm"
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(unconditional)
    with pytest.raises(PipelineError, match="not a text-to-image pipeline"):
        dmd2.main(smoke_config(dmd2, unconditional, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind


def test_dry_run_validates_and_exits(dmd2, tmp_path, capsys):
    dmd2.main(configs.parse(dmd2.DMD2Config, ["--dry_run", "true", "--output_dir", str(tmp_path / "dry")]))
    assert "flags are valid" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()


def test_validation_prompts_make_the_validation_grid(dmd2, tiny_pipeline_dir, tmp_path):
    from stepdistill import run
    from stepdistill.models.denoiser import Denoiser
    from stepdistill.models.teacher import load_teacher

    prompts = ("the digit 1, written small", "the digit 2")
    cfg = configs.parse(dmd2.DMD2Config, ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--output_dir",
                                          str(tmp_path), "--validation_prompts", *prompts])
    assert cfg.validation_prompts == prompts  # one flag value per quoted prompt, commas kept
    teacher = load_teacher(str(tiny_pipeline_dir))
    validator = run.make_validator(cfg, teacher, Denoiser(teacher.network, teacher.process), (999,), ["a training prompt"])
    assert validator.prompts == list(prompts) and validator.evaluator is None
    assert validator(3) == {} and (tmp_path / "validation" / "step-3.png").is_file()


def test_trackers_log_under_logging_dir_in_the_output_folder(tmp_path):
    from stepdistill.trainer import make_accelerator

    accelerator = make_accelerator(None, "none", tmp_path, "tensorboard")
    assert accelerator.logging_dir == str(tmp_path / "tensorboard")


def test_allow_tf32_and_tracker_project_name_reach_torch_and_the_trackers(dmd2, tmp_path, monkeypatch):
    import torch

    from stepdistill import run

    cfg = configs.parse(dmd2.DMD2Config, ["--allow_tf32", "--tracker_project_name", "digits-runs", "--output_dir",
                                          str(tmp_path), "--report_to", "none"])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    accelerator = run.start(cfg)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    projects = []
    monkeypatch.setattr(accelerator, "init_trackers", lambda name, config: projects.append(name))
    run.open_output(cfg, accelerator, "dmd2")
    assert projects == ["digits-runs"] and (tmp_path / "config.json").is_file()


def test_resuming_with_other_flags_says_which_in_one_line(dmd2, tmp_path, caplog):
    from stepdistill import run

    first = configs.parse(dmd2.DMD2Config, ["--output_dir", str(tmp_path), "--report_to", "none"])
    accelerator = run.start(first)
    run.open_output(first, accelerator, "dmd2")
    resumed = configs.parse(dmd2.DMD2Config, ["--output_dir", str(tmp_path), "--report_to", "none",
                                              "--resume_from_checkpoint", "latest", "--max_train_steps", "600",
                                              "--learning_rate", "1e-3", "--train_batch_size", "4"])
    with caplog.at_level("WARNING"):
        run.open_output(resumed, accelerator, "dmd2")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == ("resuming with flags other than those of the run it continues: --train_batch_size 32 → 4, "
                       "--learning_rate 3e-05 → 0.001")  # a longer run is no change to what it continues


def test_an_output_folder_that_cannot_be_created_is_one_line(dmd2, tmp_path):
    from stepdistill import run

    cfg = configs.parse(dmd2.DMD2Config, ["--output_dir", "/proc/stepdistill-run", "--report_to", "none"])
    with pytest.raises(ConfigError, match="--output_dir /proc/stepdistill-run cannot be created"):
        run.open_output(cfg, run.start(cfg), "dmd2")
