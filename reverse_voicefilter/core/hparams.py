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

from reverse_voicefilter.core.config_checks import check_config
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


def read_documents(text, source):
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


def merge(defaults, user, source, prefix=""):
    """Return ``defaults`` updated by ``user``; unknown keys and wrong types raise. The one merge
    of the project: configs over the defaults files, a checkpoint's ``hp_str``, the benchmarks'
    changes."""
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
            out[key] = merge(default, value, source, prefix=f"{name}.")
        elif isinstance(value, dict):
            raise UserError(f"{source}: '{name}' must be a single value, got a section")
        else:
            out[key] = _check_type(name, default, value, source)
    return out


def dump(sections):
    """Sections as the original's multi-document YAML, in their order: the one writer of configs
    (``hp_str`` in checkpoints, the runs' config.yaml, the benchmarks' configs)."""
    return "---\n".join(yaml.safe_dump({k: v}, sort_keys=False) for k, v in sections.items())


def defaults(extra=()):
    """config/default.yaml's sections, plus those of ``extra`` defaults files (GE2E's section)."""
    out = {}
    for path in (DEFAULT_CONFIG, *extra):
        out.update(read_documents(Path(path).read_text(), str(path)))
    return out


def load_hparams_string(text, source="config", extra_defaults=()):
    """Build hyper-parameters from YAML text (a file's content or a checkpoint's hp_str), merged
    over the defaults and checked (core.config_checks: ranges, choices, rules between keys)."""
    merged = merge(defaults(extra_defaults), read_documents(text, source), source)
    check_config(merged, source)
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
    """Hyper-parameters of a run, read from ``path`` (or ``text``, named ``source`` in messages)
    merged over the defaults: config/default.yaml and any ``extra_defaults`` files (the GE2E
    section's, for embedder training).

    ``hp_str`` holds the full, merged config as YAML: stored in checkpoints,
    it rebuilds the exact model without the original file.
    """

    def __init__(self, path=None, text=None, source=None, extra_defaults=()):
        if text is None:
            path = Path(path if path is not None else DEFAULT_CONFIG)
            text = read_config_text(path)
            source = source or str(path)
        else:
            source = source or "config text"
        super().__init__(load_hparams_string(text, source, extra_defaults))
        object.__setattr__(self, "path", str(path) if path is not None else None)

    @classmethod
    def from_string(cls, text, source=None, extra_defaults=()):
        return cls(text=text, source=source, extra_defaults=extra_defaults)

    @property
    def hp_str(self):
        """The full config as multi-document YAML, sections in the original's order."""
        return dump(self.to_dict())


def config_changes(old_hp_str, hp, sections=None, extra_defaults=(), ignore=()):
    """``[(key, old value, new value)]`` where the config saved as ``old_hp_str`` (a
    checkpoint's) and ``hp`` differ, within ``sections`` when given, leaving out the keys of
    ``ignore``; raises UserError when ``old_hp_str`` cannot be read."""
    old = HParam.from_string(old_hp_str, extra_defaults=extra_defaults)

    def flat(h):
        return flatten({name: h[name].to_dict() for name in (sections or h.keys())})
    before, after = flat(old), flat(hp)
    return [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and k not in ignore]


def load_hparam(filename):
    """The original's function name, kept for users' scripts."""
    return HParam(filename)
