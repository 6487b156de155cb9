import dataclasses
import json
from dataclasses import dataclass

import pytest

from stepdistill import config as configs
from stepdistill.config import ConfigError, field


@dataclass
class ToyConfig:
    """A config with one field of every supported kind."""

    steps: tuple[int, ...] = field((4,), "sampling steps")
    scales: tuple[float, ...] = field((1.0, 2.0), "guidance scales")
    learning_rate: float = field(1e-3, "learning rate")
    batch_size: int = field(8, "batch size")
    flag: bool = field(True, "a switch")
    name: str | None = field("run", "a name")
    tags: list = field(["a"], "a mutable default")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be ≥ 1 (got {self.batch_size})")


def test_defaults_without_flags():
    cfg = configs.parse(ToyConfig, [])
    assert cfg == ToyConfig()
    assert cfg.steps == (4,) and cfg.name == "run" and cfg.flag is True


def test_mutable_defaults_are_not_shared():
    first, second = ToyConfig(), ToyConfig()
    first.tags.append("b")
    assert second.tags == ["a"]


def test_flags_are_parsed_by_type():
    cfg = configs.parse(
        ToyConfig,
        ["--steps", "1,2,4", "--scales", "1,7.5", "--learning_rate", "2e-4", "--batch_size", "3", "--flag", "false", "--name", "none"],
    )
    assert cfg.steps == (1, 2, 4)
    assert cfg.scales == (1.0, 7.5)
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 3
    assert cfg.flag is False
    assert cfg.name is None


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False)])
def test_bool_spellings(text, expected):
    assert configs.parse(ToyConfig, ["--flag", text]).flag is expected


def test_a_bare_boolean_flag_means_true():
    cfg = configs.parse(ToyConfig, ["--flag", "false"])
    assert cfg.flag is False
    cfg = configs.parse(ToyConfig, ["--flag", "false", "--flag", "--batch_size", "2"])  # as diffusers' scripts take it
    assert cfg.flag is True and cfg.batch_size == 2


@dataclass
class TextConfig:
    names: tuple[str, ...] = field(("a",), "comma-separated names")
    prompts: tuple[str, ...] | None = field(None, "prompts, one per argument", one_per_argument=True)


def test_string_tuples_are_comma_separated_unless_one_per_argument():
    cfg = configs.parse(TextConfig, ["--names", "dmd2,sid", "--prompts", "a cat, sitting", "a dog"])
    assert cfg.names == ("dmd2", "sid") and cfg.prompts == ("a cat, sitting", "a dog")


def test_optional_string_keeps_other_text():
    assert configs.parse(ToyConfig, ["--name", "teacher_v2"]).name == "teacher_v2"


@pytest.mark.parametrize(
    "argv",
    [["--no_such_flag", "1"], ["--batch", "3"], ["--batch_size", "three"], ["--flag", "maybe"], ["--steps", "1,x"]],
)
def test_unknown_or_malformed_flags_exit(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_validate_error_exits_2_with_the_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--batch_size", "0"])
    assert exit_info.value.code == 2
    assert "--batch_size must be ≥ 1 (got 0)" in capsys.readouterr().err


def test_help_lists_fields_with_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--help"], prog="toy")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--learning_rate" in text and "learning rate (default: 0.001)" in text and "--config" in text


@pytest.fixture
def yaml_file(tmp_path):
    pytest.importorskip("yaml")

    def write(text: str):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path

    return write


def test_yaml_values_and_flag_override(yaml_file):
    path = yaml_file("steps: [1, 2]\nlearning_rate: 1\nflag: false\nname: null\nbatch_size: 16\n")
    cfg = configs.parse(ToyConfig, ["--config", str(path)])
    assert cfg.steps == (1, 2)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.flag is False and cfg.name is None and cfg.batch_size == 16
    overridden = configs.parse(ToyConfig, ["--config", str(path), "--steps", "8", "--batch_size", "2"])
    assert overridden.steps == (8,) and overridden.batch_size == 2
    assert overridden.flag is False


def test_yaml_unknown_keys_exit(yaml_file):
    path = yaml_file("steps: [1]\nnum_stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--config", str(path)])
    assert "num_stepz" in str(exit_info.value.code)


def test_yaml_exponent_floats_are_floats(yaml_file):
    """PyYAML reads ``3e-5`` (no dot) as a string; a float field must still take it."""
    cfg = configs.parse(ToyConfig, ["--config", str(yaml_file("learning_rate: 3e-5\nscales: [1e-1, 2]\n"))])
    assert cfg.learning_rate == 3e-5 and cfg.scales == (0.1, 2.0)


@pytest.mark.parametrize("text", ["learning_rate: fast\n", "batch_size: 2.5\n", "batch_size: true\n", "steps: 4\n", "name: 3\n", "- 1\n- 2\n"])
def test_yaml_wrong_types_exit(yaml_file, text):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--config", str(yaml_file(text))])
    assert str(exit_info.value.code).startswith("error: --config")


def test_yaml_values_are_validated(yaml_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--config", str(yaml_file("batch_size: 0\n"))])
    assert exit_info.value.code == 2
    assert "--batch_size must be ≥ 1" in capsys.readouterr().err


def test_missing_yaml_file_exits(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(ToyConfig, ["--config", str(tmp_path / "missing.yaml")])
    assert "does not exist" in str(exit_info.value.code)


def test_save_writes_json(tmp_path):
    cfg = configs.parse(ToyConfig, ["--steps", "1,2", "--name", "none"])
    configs.save(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {**dataclasses.asdict(cfg), "steps": [1, 2], "scales": [1.0, 2.0]}
    assert saved["name"] is None
    assert ToyConfig(**{k: tuple(v) if k in ("steps", "scales") else v for k, v in saved.items()}) == cfg


def test_saved_config_loads_back_as_yaml(tmp_path):
    """A run's config.json (JSON is YAML) reproduces the run through ``--config``."""
    cfg = configs.parse(ToyConfig, ["--learning_rate", "3e-05", "--steps", "1,2", "--name", "none"])
    configs.save(cfg, tmp_path / "config.json")
    assert configs.parse(ToyConfig, ["--config", str(tmp_path / "config.json")]) == cfg
