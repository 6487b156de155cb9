"""Files that ship with stepdistill, made by ``python recipes/train_teacher.py --output_dir stepdistill/assets``."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DIGITS_TEACHER = ASSETS_DIR / "teacher"
DIGITS_CLASSIFIER = ASSETS_DIR / "digits_classifier.safetensors"
DIGITS_TEACHER_BEST_GUIDANCE = 1.5  # the shipped teacher's best 50-step DDIM FD-digits (README, "The embedded teacher")
