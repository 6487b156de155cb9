"""The math of each distillation family, one module per family; see ``base.Method`` for the interface."""

from stepdistill.methods.adversarial import AdversarialDistillation
from stepdistill.methods.base import Batch, Losses, Method
from stepdistill.methods.consistency import ConsistencyDenoiser, ConsistencyDistillation
from stepdistill.methods.dmd import DMD2
from stepdistill.methods.fake_score import FakeScoreDistillation
from stepdistill.methods.progressive import ProgressiveDistillation
from stepdistill.methods.sid import SiD

__all__ = ["AdversarialDistillation", "Batch", "ConsistencyDenoiser", "ConsistencyDistillation", "DMD2", "FakeScoreDistillation", "Losses", "Method", "ProgressiveDistillation", "SiD"]
