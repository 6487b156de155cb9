"""The shared loop: TTUR ratio, accumulation, the non-finite guard, EMA and checkpoint/resume."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from torch import nn

from stepdistill.checkpoints import CheckpointError, DiskSpaceError, find_checkpoint
from stepdistill.methods.base import Batch
from stepdistill.trainer import EMA, DivergedError, Interrupted, Trainer, TrainerConfig


class CountingMethod:
    """A quadratic toy: the generator and critic each pull one parameter towards a target."""

    def __init__(self, critic_steps: int, generator: nn.Linear, critic: nn.Linear, poison_step: int | None = None):
        self.critic_steps_per_generator_step = critic_steps
        self.generator, self.critic = generator, critic
        self.generator_calls = self.critic_calls = 0
        self.poison_step = poison_step

    def generator_loss(self, batch: Batch):
        self.generator_calls += 1
        loss = (self.generator.weight - 1).square().sum()
        if self.generator_calls == self.poison_step:
            loss = loss * float("nan")
        return {"loss": loss}

    def critic_loss(self, batch: Batch):
        self.critic_calls += 1
        return {"loss": (self.critic.weight + 1).square().sum()}


def make_trainer(tmp_path, critic_steps=3, steps=4, accumulation=1, poison_step=None, validate=None,
                 method_class=None, **overrides):
    torch.manual_seed(0)  # every trainer starts from the same weights, whatever ran before
    generator, critic = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    method = (method_class or CountingMethod)(critic_steps, generator, critic, poison_step)
    cfg = TrainerConfig(output_dir=str(tmp_path), max_train_steps=steps, learning_rate=0.1, critic_learning_rate=0.1,
                        adam_weight_decay=0.0, gradient_accumulation_steps=accumulation, **overrides)
    batch = Batch(condition={"prompt_embeds": torch.zeros(1, 1, 1)},
                  unconditional={"prompt_embeds": torch.zeros(1, 1, 1)})
    trainer = Trainer(cfg, method, [generator], list(generator.parameters()), [critic], list(critic.parameters()),
                      next_batch=lambda: batch, validate=validate)
    return trainer, method


def optimizer_steps(optimizer) -> int:
    return int(next(iter(optimizer.state.values()))["step"])


def test_ttur_ratio_is_respected(tmp_path):
    trainer, method = make_trainer(tmp_path, critic_steps=3, steps=4)
    trainer.fit()
    assert (method.generator_calls, method.critic_calls) == (4, 12)
    assert optimizer_steps(trainer.generator_optimizer) == 4
    assert optimizer_steps(trainer.critic_optimizer) == 12
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 4


def test_learning_rate_schedules_follow_each_optimisers_updates(tmp_path):
    trainer, _ = make_trainer(tmp_path, critic_steps=3, steps=4, lr_scheduler="linear")
    trainer.fit()  # linear decay to 0 over 4 generator updates and 12 critic updates
    assert trainer.generator_optimizer.param_groups[0]["lr"] == 0.0
    assert trainer.critic_optimizer.param_groups[0]["lr"] == 0.0
    half, _ = make_trainer(tmp_path / "half", critic_steps=3, steps=4, lr_scheduler="linear")
    half.cfg.max_train_steps = 2  # stop halfway through the same schedule
    half.fit()
    assert half.generator_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert half.critic_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_methods_hook_follows_applied_generator_updates(tmp_path):
    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=4, poison_step=2)
    calls = []
    method.after_generator_update = lambda: calls.append(method.generator_calls)
    trainer.fit()
    assert calls == [1, 3, 4]  # not after the skipped (non-finite) second update


def test_gradient_accumulation_draws_micro_batches(tmp_path):
    trainer, method = make_trainer(tmp_path, critic_steps=2, steps=3, accumulation=4)
    trainer.fit()
    assert (method.generator_calls, method.critic_calls) == (12, 24)
    assert optimizer_steps(trainer.generator_optimizer) == 3


def test_non_finite_loss_skips_the_update(tmp_path):
    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=3, poison_step=2)
    trainer.fit()
    assert trainer.progress.skipped_updates == 1
    assert optimizer_steps(trainer.generator_optimizer) == 2
    assert torch.isfinite(method.generator.weight).all()


def test_a_run_of_non_finite_losses_stops_training(tmp_path):
    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=6, max_consecutive_skips=2, checkpointing_steps=1)
    method.generator_loss = lambda batch: {"loss": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(DivergedError, match="2 generator updates in a row .*checkpoint-1"):
        trainer.fit()
    assert trainer.progress.step == 1  # the first step's skip was counted, the second stopped the run
    assert (tmp_path / "checkpoint-1").is_dir()


def test_ema_tracks_the_parameters():
    param = nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.5)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()
    ema.update()
    ema.copy_to_parameters()
    torch.testing.assert_close(param.data, torch.full((3,), 0.75))


def test_validation_sees_the_ema_weights_and_leaves_the_live_ones(tmp_path):
    seen = []

    def validate(step):
        seen.append((step, trainer.ema.parameters[0].detach().clone()))
        return {"validation/score": float(step)}

    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=4, validate=validate, ema_decay=0.5, validation_steps=2)
    trainer.fit()
    assert [step for step, _ in seen] == [2, 4]
    torch.testing.assert_close(seen[-1][1], trainer.ema.shadow[0])  # validated on the average ...
    assert not torch.equal(method.generator.weight, trainer.ema.shadow[0])  # ... and the live weights came back
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row.get("validation/score") for row in log] == [None, 2.0, None, 4.0]
    assert all(b["seconds"] > a["seconds"] for a, b in zip(log, log[1:]))


def test_checkpoint_resume_continues_where_it_stopped(tmp_path):
    full, full_method = make_trainer(tmp_path / "full", steps=6, ema_decay=0.9, lr_scheduler="cosine")
    full.fit()
    first, _ = make_trainer(tmp_path / "split", steps=6, checkpointing_steps=3, ema_decay=0.9, lr_scheduler="cosine")
    first.cfg.max_train_steps = 3  # a run of 6 steps that stops (crashes) after step 3
    first.fit()
    checkpoint = find_checkpoint(tmp_path / "split", "latest")
    assert checkpoint.name == "checkpoint-3"
    assert not list((tmp_path / "split").glob("*.partial")) and not list(checkpoint.glob("custom_checkpoint*"))
    second, second_method = make_trainer(tmp_path / "split", steps=6, resume_from_checkpoint="latest", ema_decay=0.9,
                                         lr_scheduler="cosine")
    second.fit()
    assert second.progress.step == 6 and second_method.generator_calls == 3
    torch.testing.assert_close(second_method.generator.weight, full_method.generator.weight, atol=0, rtol=0)
    torch.testing.assert_close(second_method.critic.weight, full_method.critic.weight, atol=0, rtol=0)
    torch.testing.assert_close(second.ema.shadow, full.ema.shadow, atol=0, rtol=0)


class StatefulMethod(CountingMethod):
    """The toy with state of its own outside the optimised networks: a running mean of the generator's weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean = torch.zeros(1, 2)

    def after_generator_update(self):
        self.mean = 0.5 * self.mean + 0.5 * self.generator.weight.detach()

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


def stateful_trainer(tmp_path, steps, **overrides):
    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=steps, **overrides)
    trainer.method = StatefulMethod(1, method.generator, method.critic)
    return trainer, trainer.method


def test_a_methods_own_state_is_checkpointed_and_resumed_exactly(tmp_path):
    full, full_method = stateful_trainer(tmp_path / "full", steps=4)
    full.fit()
    first, _ = stateful_trainer(tmp_path / "split", steps=2, checkpointing_steps=2)
    first.fit()
    assert (tmp_path / "split" / "checkpoint-2" / "method.safetensors").is_file()
    second, resumed = stateful_trainer(tmp_path / "split", steps=4, resume_from_checkpoint="latest")
    second.fit()
    assert resumed.generator_calls == 2
    torch.testing.assert_close(resumed.mean, full_method.mean, atol=0, rtol=0)


def test_old_checkpoints_are_pruned(tmp_path):
    trainer, _ = make_trainer(tmp_path, steps=6, checkpointing_steps=1, checkpoints_total_limit=2)
    trainer.fit()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_damaged_checkpoints_are_named_and_latest_passes_over_them(tmp_path):
    trainer, _ = make_trainer(tmp_path, steps=4, checkpointing_steps=2)
    trainer.fit()
    weights = next((tmp_path / "checkpoint-4").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=f"checkpoint-4 is damaged: {weights.name} has"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    (tmp_path / "checkpoint-2" / "stepdistill_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        find_checkpoint(tmp_path, "latest")


def test_latest_resolves_names_in_the_output_folder_and_starts_afresh_without_checkpoints(tmp_path, caplog):
    assert find_checkpoint(tmp_path / "fresh", "latest") is None
    trainer, _ = make_trainer(tmp_path / "fresh", steps=2, resume_from_checkpoint="latest", checkpointing_steps=2)
    with caplog.at_level("INFO"):
        trainer.fit()
    assert trainer.progress.step == 2 and "starting a new run" in caplog.text
    assert find_checkpoint(tmp_path / "fresh", "checkpoint-2") == tmp_path / "fresh" / "checkpoint-2"
    with pytest.raises(CheckpointError, match="no checkpoint folder .*fresh/checkpoint-9"):
        find_checkpoint(tmp_path / "fresh", "checkpoint-9")


def test_a_bare_checkpoint_name_is_looked_up_in_the_output_folder_first(tmp_path, monkeypatch):
    for run in ("run1", "run2"):
        trainer, _ = make_trainer(tmp_path / run, steps=2, checkpointing_steps=2)
        trainer.fit()
    monkeypatch.chdir(tmp_path / "run1")  # which holds a checkpoint-2 of its own
    assert find_checkpoint(tmp_path / "run2", "checkpoint-2") == tmp_path / "run2" / "checkpoint-2"


def interrupt_during_generator_update(method, update: int) -> None:
    """Send this process a Ctrl-C (SIGINT) during the method's ``update``-th generator update."""
    loss = method.generator_loss

    def interrupting(batch):
        if method.generator_calls == update - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(batch)

    method.generator_loss = interrupting


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path):
    full, full_method = make_trainer(tmp_path / "full", steps=5, ema_decay=0.9)
    full.fit()
    stopped, method = make_trainer(tmp_path / "split", steps=5, checkpointing_steps=4, ema_decay=0.9)
    interrupt_during_generator_update(method, 2)
    with pytest.raises(Interrupted, match="interrupted at step 2") as stop:
        stopped.fit()
    assert stop.value.checkpoint == tmp_path / "split" / "checkpoint-2" and method.generator_calls == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    resumed, resumed_method = make_trainer(tmp_path / "split", steps=5, resume_from_checkpoint="latest", ema_decay=0.9)
    resumed.fit()
    torch.testing.assert_close(resumed_method.generator.weight, full_method.generator.weight, atol=0, rtol=0)
    torch.testing.assert_close(resumed.ema.shadow, full.ema.shadow, atol=0, rtol=0)


def test_ctrl_c_without_checkpointing_stops_with_nothing_saved(tmp_path):
    trainer, method = make_trainer(tmp_path, steps=5)
    interrupt_during_generator_update(method, 3)
    with pytest.raises(Interrupted) as stop:
        trainer.fit()
    assert (stop.value.step, stop.value.checkpoint) == (3, None) and not list(tmp_path.glob("checkpoint-*"))


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    first, _ = make_trainer(tmp_path, steps=5, checkpointing_steps=3)
    first.fit()  # steps 4 and 5 were logged after the last checkpoint, as if the run then crashed
    second, _ = make_trainer(tmp_path, steps=5, resume_from_checkpoint="latest")
    second.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_disk_too_small_for_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    trainer, method = make_trainer(tmp_path, steps=2, checkpointing_steps=1)
    assert trainer.checkpoint_bytes() == (2 + 2) * 4 + 2 * 4 * (2 + 2)  # two 2-weight layers, AdamW moments
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 10))
    with pytest.raises(DiskSpaceError, match="0.00 GB free but checkpoints need about"):
        trainer.fit()
    assert method.generator_calls == 0


def test_a_checkpoint_of_other_networks_or_damaged_in_place_is_one_clear_error(tmp_path):
    trainer, _ = make_trainer(tmp_path, steps=2, checkpointing_steps=2)
    trainer.fit()
    bigger, _ = make_trainer(tmp_path, steps=4, resume_from_checkpoint="latest")
    bigger.modules[0].weight = nn.Parameter(torch.zeros(1, 3))  # not the network that was checkpointed
    with pytest.raises(CheckpointError, match="cannot load .*checkpoint-2 .*other networks or flags"):
        bigger.fit()
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(b"\0" * 32 + weights.read_bytes()[32:])  # the same size, its header overwritten
    resumed, _ = make_trainer(tmp_path, steps=4, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match="cannot load .*checkpoint-2 .*damaged"):
        resumed.fit()


class StagedMethod(CountingMethod):
    """The toy in stages: the generator is pulled towards its stage teacher plus one, and each
    hand-over copies the generator's weight into that teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.teacher, self.handovers, self.learning_rates = 0, torch.zeros(1, 2), [], []
        self.optimizer = None

    def generator_loss(self, batch):
        self.generator_calls += 1
        self.learning_rates.append(self.optimizer.param_groups[0]["lr"])
        return {"loss": (self.generator.weight - self.teacher - 1).square().sum()}

    def begin_stage(self, stage):
        self.handovers.append(stage)
        self.stage, self.teacher = stage, self.generator.weight.detach().clone()

    def state_dict(self):
        return {"stage": torch.tensor([self.stage]), "teacher": self.teacher}

    def load_state_dict(self, state):
        self.stage, self.teacher = int(state["stage"]), state["teacher"]


def staged_trainer(tmp_path, steps, **overrides):
    trainer, method = make_trainer(tmp_path, critic_steps=1, steps=steps, stage_steps=3, lr_scheduler="linear",
                                   method_class=StagedMethod, **overrides)
    method.optimizer = trainer.generator_optimizer
    ended = []
    trainer.end_stage = ended.append
    return trainer, method, ended


def test_each_stage_hands_over_and_starts_fresh_optimisers_and_schedules(tmp_path):
    trainer, method, ended = staged_trainer(tmp_path, steps=9)
    trainer.fit()
    assert method.handovers == [1, 2] and ended == [0, 1] and trainer.progress.stage == 2
    assert method.learning_rates == pytest.approx([0.1, 0.2 / 3, 0.1 / 3] * 3)  # linear decay over each stage's 3 steps
    assert optimizer_steps(trainer.generator_optimizer) == 3  # Adam's moments and step count restart each stage
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("stop_at", [3, 4], ids=["at-the-boundary", "inside-stage-1"])
def test_resume_across_a_stage_boundary_equals_an_uninterrupted_run(tmp_path, stop_at):
    full, full_method, _ = staged_trainer(tmp_path / "full", steps=6)
    full.fit()
    first, _, _ = staged_trainer(tmp_path / "split", steps=6, checkpointing_steps=stop_at)
    first.cfg.max_train_steps = stop_at  # a run of 6 steps that stops after step ``stop_at``
    first.fit()
    second, resumed, ended = staged_trainer(tmp_path / "split", steps=6, resume_from_checkpoint="latest")
    second.fit()
    assert second.progress.stage == 1 and resumed.handovers == ([1] if stop_at == 3 else [])
    assert ended == ([0] if stop_at == 3 else [])
    torch.testing.assert_close(resumed.generator.weight, full_method.generator.weight, atol=0, rtol=0)
    torch.testing.assert_close(resumed.teacher, full_method.teacher, atol=0, rtol=0)
    assert resumed.learning_rates == full_method.learning_rates[stop_at:]


def test_stages_need_a_staged_method_and_no_ema(tmp_path):
    with pytest.raises(ValueError, match="begin_stage"):
        make_trainer(tmp_path, steps=6, stage_steps=3)
    with pytest.raises(ValueError, match="ema_decay must be 0"):
        make_trainer(tmp_path, steps=6, stage_steps=3, ema_decay=0.9, method_class=StagedMethod)
