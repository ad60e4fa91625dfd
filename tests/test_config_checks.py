"""Every number of a config is range-checked when the config is read, from one table
(core/config_checks.py), and the rules between keys hold: one line naming the key, never a
traceback or a useless run."""
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from reverse_voicefilter.core.config_checks import CHOICES, RANGES, RULES
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam, defaults, dump, flatten
from reverse_voicefilter.embedding.config import GE2E_DEFAULTS

ALL_DEFAULTS = flatten(defaults([GE2E_DEFAULTS]))
NUMERIC = sorted(k for k, v in ALL_DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def config_with(key, value):
    """YAML text of the defaults (with the GE2E section) where ``key`` is ``value``."""
    sections = defaults([GE2E_DEFAULTS])
    node = sections
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return dump(sections)


def read(text):
    return HParam(text=text, source="c.yaml", extra_defaults=(GE2E_DEFAULTS,))


def outside(key):
    """A value just outside ``key``'s range, of the key's type (None where it has no bound)."""
    allowed, default = RANGES[key], ALL_DEFAULTS[key]
    if allowed.lo is not None:
        step = 1 if isinstance(default, int) else 1e-3 * max(1.0, abs(allowed.lo))
        value = allowed.lo if allowed.lo_open else allowed.lo - step
    elif allowed.hi is not None:
        step = 1 if isinstance(default, int) else 1e-3 * max(1.0, abs(allowed.hi))
        value = allowed.hi if allowed.hi_open else allowed.hi + step
    else:
        return None
    return type(default)(value)


def test_every_numeric_key_has_a_range():
    assert set(NUMERIC) == set(RANGES)
    assert all(k in ALL_DEFAULTS for k in CHOICES)


def test_the_defaults_and_the_shipped_configs_pass():
    read(config_with("train.seed", 1234))
    for path in sorted((ROOT / "config").glob("*.yaml")):
        extra = (GE2E_DEFAULTS,) if path.name.startswith("ge2e") else ()
        HParam(path, extra_defaults=extra)


@pytest.mark.parametrize("key", NUMERIC)
def test_a_value_out_of_range_is_one_line_naming_the_key(key):
    value = outside(key)
    if value is not None:
        with pytest.raises(UserError, match=rf"^c\.yaml: {key} must be .*, got "):
            read(config_with(key, value))
    if isinstance(ALL_DEFAULTS[key], float):
        for bad in (math.nan, math.inf):
            with pytest.raises(UserError, match=rf"^c\.yaml: {key} must be "):
                read(config_with(key, bad))


@pytest.mark.parametrize("key, value", [("model.lstm_dim", -1), ("model.conv_channels", 0), ("audio.hop_length", 0),
                                        ("audio.sample_rate", 0), ("train.adam", -0.001), ("model.fc1_dim", 0),
                                        ("audio.ref_level_db", math.nan)])
def test_the_values_that_crashed_or_trained_a_useless_model(key, value):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        read(config_with(key, value))


@pytest.mark.parametrize("keys, message", [(keys, message) for keys, _, message in RULES])
def test_each_rule_between_keys_is_enforced(keys, message):
    breaking = {
        ("audio.n_fft", "audio.num_freq"): ("audio.num_freq", 600),
        ("audio.num_freq", "model.fc2_dim"): ("model.fc2_dim", 600),
        ("audio.win_length", "audio.n_fft"): ("audio.win_length", 1300),
        ("audio.hop_length", "audio.win_length"): ("audio.hop_length", 401),
        ("audio.min_level_db", "audio.ref_level_db"): ("audio.ref_level_db", -150.0),
    }[keys]
    with pytest.raises(UserError) as err:
        read(config_with(*breaking))
    assert str(err.value).startswith(f"c.yaml: {message}") and "\n" not in str(err.value)


def test_a_choice_out_of_its_list_names_the_choices():
    with pytest.raises(UserError, match=r"train\.loss must be one of mse, power_law, got 'l1'"):
        read(config_with("train.loss", "l1"))


def test_trainer_refuses_a_bad_config_in_one_line_before_any_work(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  lstm_dim: -4\n")
    done = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "-c", str(config), "-m", "x", "-b",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {config}: model.lstm_dim must be at least 1, got -4"
    assert not (tmp_path / "chkpt").exists()
