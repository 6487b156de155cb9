"""The tuned settings ship as presets (``recipes/configs/<recipe>_<name>.yaml``, ``--config <name>``): each
loads into its recipe, passes the recipe's checks, and says in a comment what it measured (or that it
was not run here)."""

from __future__ import annotations

import pytest
import yaml

from stepdistill import config as configs
from stepdistill.assets import PRESETS_DIR, SHIPPED_TEACHERS, pipeline_location

PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))
CONFIG_CLASSES = {"dmd2": "DMD2Config", "sid": "SiDConfig", "consistency": "ConsistencyConfig",
                  "progressive": "ProgressiveConfig", "add": "AddConfig"}


def test_the_readmes_tuned_commands_ship_as_presets():
    assert {p.stem for p in PRESETS} >= {"dmd2_4step", "sid_4step", "consistency_one_segment", "dmd2_sd15",
                                         "consistency_lcm_lora_sd15", "progressive_sd15"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_preset_loads_by_name_into_its_recipe_and_validates(preset, request, tiny_pipeline_dir, tmp_path, capsys):
    recipe_name = preset.stem.split("_")[0]
    recipe = request.getfixturevalue(recipe_name)
    text = preset.read_text()
    assert f"recipes/{recipe_name}.py --config {preset.stem}" in text  # the comment shows how to launch it
    assert "Measured" in text or "Not run from this repository" in text
    values = yaml.safe_load(text)
    overrides = {"output_dir": str(tmp_path / "run")}
    if values.get("pretrained_model_name_or_path") not in SHIPPED_TEACHERS:  # a hub model: the tiny pipeline stands in
        overrides["pretrained_model_name_or_path"] = str(tiny_pipeline_dir)
    cfg = configs.parse(getattr(recipe, CONFIG_CLASSES[recipe_name]), [
        "--config", preset.stem, *(f"--{k}={v}" for k, v in overrides.items()), "--dry_run"], presets={preset.stem: preset})
    for key, value in values.items():
        if key not in overrides:
            assert getattr(cfg, key) == (pipeline_location(value) if key == "pretrained_model_name_or_path" else value), key
    recipe.main(cfg)  # --dry_run: the recipe's own checks, then exit
    assert "flags are valid" in capsys.readouterr().out


def test_a_recipe_offers_its_own_presets_only(sid, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["recipes/sid.py", "--config", "dmd2_4step", "--dry_run"])
    with pytest.raises(SystemExit, match="--config dmd2_4step does not exist and is not a preset \\(sid_4step, sid_gan, sid_sd3\\)"):
        sid.run.command_line(sid.SiDConfig, sid.main, prog="recipes/sid.py")
    monkeypatch.setattr("sys.argv", ["recipes/sid.py", "--config", "sid_4step", "--dry_run"])
    sid.run.command_line(sid.SiDConfig, sid.main, prog="recipes/sid.py")
    assert "flags are valid" in capsys.readouterr().out
