"""Hyper-parameters: the original's multi-document YAML with dot access.

``HParam(path)`` reads a config the way the original did (``hp.audio.n_fft``),
but safely (``yaml.safe_load_all``) and strictly: the user's file is merged
over ``config/default.yaml``, so omitted keys take their defaults, while an
unknown key or a value of the wrong type is a :class:`UserError` naming the
key, because a typo silently falling back to a default wastes a training run.
"""
import copy
import logging
from pathlib import Path

import yaml

from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


class Dotdict(dict):
    """A dict whose keys are also attributes, recursively (``hp.train.adam``)."""

    def __init__(self, mapping=None):
        super().__init__()
        for key, value in (mapping or {}).items():
            self[key] = Dotdict(value) if isinstance(value, dict) else value

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = Dotdict(value) if isinstance(value, dict) and not isinstance(value, Dotdict) else value

    def __deepcopy__(self, memo):
        return Dotdict(copy.deepcopy(dict(self), memo))

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Dotdict) else v for k, v in self.items()}


def flatten(d, prefix=""):
    """``{'train': {'adam': 0.001}}`` -> ``{'train.adam': 0.001}`` (for comparing configs key by key)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_documents(text, source):
    """Merge the YAML documents of ``text`` into one dict of sections."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from None
    merged = {}
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise UserError(f"{source}: each YAML document must be a mapping of sections")
        merged.update(doc)
    return merged


def _check_type(key, default, value, source):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise UserError(
            f"{source}: '{key}' must be {type(default).__name__}, got {value!r} ({type(value).__name__})"
        )
    if isinstance(default, float):
        return float(value)
    return value


def _merge(defaults, user, source, prefix=""):
    """Return ``defaults`` updated by ``user``; unknown keys and wrong types raise."""
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise UserError(f"{source}: unknown key '{name}' (known here: {known})")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{name}' must be a section of keys, got {value!r}")
            out[key] = _merge(default, value, source, prefix=f"{name}.")
        elif isinstance(value, dict):
            raise UserError(f"{source}: '{name}' must be a single value, got a section")
        else:
            out[key] = _check_type(name, default, value, source)
    return out


def _validate(hp, source):
    """Derived sizes are checked, not trusted."""
    audio = hp["audio"]
    if audio["num_freq"] != audio["n_fft"] // 2 + 1:
        raise UserError(
            f"{source}: audio.num_freq ({audio['num_freq']}) must be n_fft // 2 + 1 = {audio['n_fft'] // 2 + 1}"
        )
    if hp["model"]["fc2_dim"] != audio["num_freq"]:
        raise UserError(f"{source}: model.fc2_dim ({hp['model']['fc2_dim']}) must equal audio.num_freq")
    if audio["win_length"] > audio["n_fft"]:
        raise UserError(f"{source}: audio.win_length must not exceed audio.n_fft")
    choices = {
        ("train", "optimizer"): ("adam", "adabound"),
        ("train", "loss"): ("mse", "power_law"),
        ("train", "precision"): ("fp32", "bf16", "fp16"),
        ("data", "mixing"): ("precomputed", "online"),
        ("train", "lr_schedule"): ("constant", "warmup_cosine"),
    }
    for (section, key), allowed in choices.items():
        if hp[section][key] not in allowed:
            raise UserError(f"{source}: {section}.{key} must be one of {', '.join(allowed)}")
    for key in ("batch_size", "summary_interval", "checkpoint_interval"):
        if hp["train"][key] < 1:
            raise UserError(f"{source}: train.{key} must be at least 1")
    if hp["train"]["warmup_steps"] < 0 or not 0 <= hp["train"]["lr_final_ratio"] <= 1:
        raise UserError(f"{source}: train.warmup_steps must not be negative and train.lr_final_ratio must be in [0, 1]")
    if hp["data"]["audio_len"] <= 0:
        raise UserError(f"{source}: data.audio_len must be positive")
    for key in ("train_subsets", "test_subsets"):
        value = hp["data"][key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{source}: data.{key} must be a list of subset folder names, got {value!r}")
    for key in ("epoch_samples", "audio_cache_mb", "mixing_seed"):
        if hp["data"][key] < 0:
            raise UserError(f"{source}: data.{key} must not be negative")


def _default_dict():
    return _read_documents(DEFAULT_CONFIG.read_text(), str(DEFAULT_CONFIG))


def load_hparams_string(text, source="config"):
    """Build hyper-parameters from YAML text (a file's content or a checkpoint's hp_str)."""
    merged = _merge(_default_dict(), _read_documents(text, source), source)
    _validate(merged, source)
    return merged


def read_config_text(path):
    """The text of a config file; a missing or unreadable one is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config {path}: {err}") from None


class HParam(Dotdict):
    """Hyper-parameters of a run, read from ``path`` merged over the defaults.

    ``hp_str`` holds the full, merged config as YAML: stored in checkpoints,
    it rebuilds the exact model without the original file.
    """

    def __init__(self, path=None, text=None):
        if text is None:
            path = Path(path if path is not None else DEFAULT_CONFIG)
            text = read_config_text(path)
            source = str(path)
        else:
            source = "config text"
        super().__init__(load_hparams_string(text, source))
        object.__setattr__(self, "path", str(path) if path is not None else None)

    @classmethod
    def from_string(cls, text):
        return cls(text=text)

    @property
    def hp_str(self):
        """The full config as multi-document YAML, sections in the original's order."""
        return "---\n".join(yaml.safe_dump({k: v}, sort_keys=False) for k, v in self.to_dict().items())


def config_changes(old_hp_str, hp, sections=None):
    """``[(key, old value, new value)]`` where the config saved as ``old_hp_str`` (a
    checkpoint's) and ``hp`` differ, within ``sections`` when given; raises UserError when
    ``old_hp_str`` cannot be read."""
    old = HParam.from_string(old_hp_str)

    def flat(h):
        return flatten({name: h[name].to_dict() for name in (sections or h.keys())})
    before, after = flat(old), flat(hp)
    return [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def load_hparam(filename):
    """The original's function name, kept for users' scripts."""
    return HParam(filename)
