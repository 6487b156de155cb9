"""Files that ship with stepdistill: the digits teachers and classifier, made by ``python
recipes/train_teacher.py --output_dir stepdistill/assets [--format sd3]``, and where the recipes and
their presets are."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DIGITS_TEACHER = ASSETS_DIR / "teacher"  # StableDiffusionPipeline: ε-prediction UNet, DDIM
DIGITS_TEACHER_SD3 = ASSETS_DIR / "teacher_sd3"  # StableDiffusion3Pipeline: flow-matching MMDiT, Euler
DIGITS_CLASSIFIER = ASSETS_DIR / "digits_classifier.safetensors"
DIGITS_TEACHER_BEST_GUIDANCE = 1.5  # the ε teacher's best 50-step DDIM FD-digits (README, "The embedded teachers")
DIGITS_ANCESTRAL_BEST_GUIDANCE = 1.25  # … and its best with the ancestral (DDPM) sampler

# The shipped teachers by short name (--pretrained_model_name_or_path digits-sd3), and each one's
# best 50-step classifier-free guidance scale (README, "The embedded teachers").
SHIPPED_TEACHERS = {"digits": DIGITS_TEACHER, "digits-sd3": DIGITS_TEACHER_SD3}
BEST_GUIDANCE = {DIGITS_TEACHER: DIGITS_TEACHER_BEST_GUIDANCE, DIGITS_TEACHER_SD3: 1.0}


def pipeline_location(name_or_path: str) -> str:
    """A shipped teacher's folder for its short name (``digits``, ``digits-sd3``); anything else as given."""
    return str(SHIPPED_TEACHERS.get(name_or_path, name_or_path))


def shipped_best_guidance(name_or_path: str) -> float | None:
    """The best CFG scale of a shipped teacher's folder (or short name); None for any other pipeline."""
    return BEST_GUIDANCE.get(Path(pipeline_location(name_or_path)).expanduser().resolve())


# The recipes install beside the library as stepdistill/recipes (pyproject maps the package to the
# checkout's recipes/), and sit beside the package in a source checkout.
_INSTALLED_RECIPES = ASSETS_DIR.parent / "recipes"
RECIPES_DIR = _INSTALLED_RECIPES if _INSTALLED_RECIPES.is_dir() else ASSETS_DIR.parents[1] / "recipes"
PRESETS_DIR = RECIPES_DIR / "configs"  # tuned settings as YAML, for --config NAME


def recipe_presets(recipe: str) -> dict[str, Path]:
    """A recipe's own presets by name: ``recipes/configs/<recipe>_*.yaml``."""
    return {path.stem: path for path in sorted(PRESETS_DIR.glob(f"{recipe}_*.yaml"))}
