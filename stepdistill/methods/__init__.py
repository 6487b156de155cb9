"""The math of each distillation family, one module per family; see ``base.Method`` for the interface."""

from stepdistill.methods.base import Batch, Losses, Method
from stepdistill.methods.dmd import DMD2

__all__ = ["Batch", "DMD2", "Losses", "Method"]
