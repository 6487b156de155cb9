"""Files that ship with stepdistill: the digits teacher and classifier, made by ``python
recipes/train_teacher.py --output_dir stepdistill/assets``, and where the recipes and their presets are."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DIGITS_TEACHER = ASSETS_DIR / "teacher"
DIGITS_CLASSIFIER = ASSETS_DIR / "digits_classifier.safetensors"
DIGITS_TEACHER_BEST_GUIDANCE = 1.5  # the shipped teacher's best 50-step DDIM FD-digits (README, "The embedded teacher")

# The recipes install beside the library as stepdistill/recipes (pyproject maps the package to the
# checkout's recipes/), and sit beside the package in a source checkout.
_INSTALLED_RECIPES = ASSETS_DIR.parent / "recipes"
RECIPES_DIR = _INSTALLED_RECIPES if _INSTALLED_RECIPES.is_dir() else ASSETS_DIR.parents[1] / "recipes"
PRESETS_DIR = RECIPES_DIR / "configs"  # tuned settings as YAML, for --config NAME
