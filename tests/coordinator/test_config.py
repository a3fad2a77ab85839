"""Trial files: defaults, overrides, and clear refusals naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import load_trial
from coordinator.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trial.toml"
    path.write_text(text)
    return path


def test_file_values_then_flags_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[trial]\nmodel = "vgg11"\nrounds = 3\n[train]\nlr = 1\n[transfer]\ncompression = "fp16"\n')
    config = load_trial(path, {"rounds": 5, "train.batch_size": 16, "mode": None})
    assert (config.model, config.rounds, config.mode) == ("vgg11", 5, "p2p")
    assert config.train.lr == 1.0 and config.train.batch_size == 16 and config.transfer.compression == "fp16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[trial]\nmodle = 'cnn'\n", "unknown key trial.modle"),
        ("[trial]\nrounds = 'three'\n", "trial.rounds must be int"),
        ("[trial]\nmode = 'ring'\n", "trial.mode must be one of"),
        ("[trial]\nname = 'a/b'\n", "trial.name"),
        ("[train]\nlr = -1.0\n", "train.lr must be > 0"),
        ("[train]\nlr_decay = 1.0\n", "train.lr_decay must be in"),
        ("[trial]\nalgorithm = 'split'\n[train]\nlr_decay = 0.5\n", "train.lr_decay applies to snake"),
        ("[transfer]\nchunk_bytes = 100\n", "transfer.chunk_bytes"),
        ("[extras]\nx = 1\n", "unknown section"),
        ("[trial\n", "not valid TOML"),
    ],
)
def test_bad_trial_files_are_refused_with_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_trial(write(tmp_path, text))


def test_missing_trial_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_trial(tmp_path / "nope.toml")


def test_kd_settings_default_off_and_are_validated(tmp_path: Path) -> None:
    config = load_trial(None)
    assert (config.train.kd_alpha, config.train.kd_temperature) == (0.0, 2.0)
    config = load_trial(write(tmp_path, "[train]\nkd_alpha = 1\nkd_temperature = 4.0\n"))
    assert (config.train.kd_alpha, config.train.kd_temperature) == (1.0, 4.0)
    for text, message in (("kd_alpha = -0.5", "kd_alpha"), ("kd_temperature = 0.0", "kd_temperature")):
        with pytest.raises(ConfigError, match=message):
            load_trial(write(tmp_path, f"[train]\n{text}\n"))


def test_every_example_trial_file_loads() -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))
    assert len(examples) >= 4
    for path in examples:
        assert load_trial(path).name in path.stem, path  # parses, validates, and is the trial it says it is
