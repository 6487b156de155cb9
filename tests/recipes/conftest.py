"""The recipes, imported from their files as the scripts they are (each under its own module name)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from stepdistill.assets import RECIPES_DIR


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the config's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def dmd2():
    yield from _recipe("dmd2")


@pytest.fixture(scope="module")
def add():
    yield from _recipe("add")


@pytest.fixture(scope="module")
def consistency():
    yield from _recipe("consistency")


@pytest.fixture(scope="module")
def train_teacher():
    yield from _recipe("train_teacher")


@pytest.fixture(scope="module")
def sid():
    yield from _recipe("sid")


@pytest.fixture(scope="module")
def progressive():
    yield from _recipe("progressive")
