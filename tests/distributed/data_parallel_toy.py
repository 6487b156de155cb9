"""Train a toy through the Trainer, one process or several; each process takes its slice of a global batch.

    python tests/distributed/data_parallel_toy.py OUT [--steps N] [--resume]                       # one process
    torchrun --nproc_per_node 2 tests/distributed/data_parallel_toy.py OUT [--layout replicate|shard]  # two

A checkpoint is written every step; with ``--resume`` the run continues from the latest one. Writes
the final generator and critic weights, whole, to OUT/weights.pt (main process only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from stepdistill import sharding
from stepdistill.methods.base import Batch
from stepdistill.trainer import Trainer, TrainerConfig

GLOBAL_BATCH = 8


class RegressionToy:
    """Generator and critic each fit a linear map to a fixed global batch; losses are batch means."""

    critic_steps_per_generator_step = 2

    def __init__(self, generator: nn.Linear, critic: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor):
        self.generator, self.critic, self.inputs, self.targets = generator, critic, inputs, targets

    def generator_loss(self, batch: Batch):
        inputs, targets = batch.condition["prompt_embeds"], batch.unconditional["prompt_embeds"]
        return {"loss": (self.generator(inputs) - targets).square().mean()}

    def critic_loss(self, batch: Batch):
        inputs, targets = batch.condition["prompt_embeds"], batch.unconditional["prompt_embeds"]
        return {"loss": (self.critic(inputs) + targets).square().mean()}


def main(output_dir: Path, steps: int, resume: bool, layout: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # the same weights and data on every process
    generator, critic = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), nn.Linear(4, 2)
    inputs, targets = torch.randn(GLOBAL_BATCH, 4), torch.randn(GLOBAL_BATCH, 2)
    share = GLOBAL_BATCH // accelerator.num_processes
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    batch = Batch(condition={"prompt_embeds": inputs[mine]}, unconditional={"prompt_embeds": targets[mine]})
    cfg = TrainerConfig(output_dir=str(output_dir), max_train_steps=steps, learning_rate=0.05, critic_learning_rate=0.05,
                        adam_weight_decay=0.0, checkpointing_steps=1, resume_from_checkpoint="latest" if resume else None,
                        layout=layout, max_grad_norm=0.5)
    trainer = Trainer(cfg, RegressionToy(generator, critic, inputs, targets), [generator], list(generator.parameters()),
                      [critic], list(critic.parameters()), next_batch=lambda: batch, accelerator=accelerator)
    trainer.fit()
    weights = {role: sharding.gather(module) if trainer.sharding else module.state_dict()
               for role, module in (("generator", generator), ("critic", critic))}
    if accelerator.is_main_process:
        torch.save(weights, output_dir / "weights.pt")
    accelerator.wait_for_everyone()  # as the recipes do: a process leaving the group first can abort gloo
    accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layout", default="replicate")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    main(args.output_dir, args.steps, args.resume, args.layout)
