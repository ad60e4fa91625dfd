"""GE2E configs: the sections of config/default.yaml plus a ``ge2e`` section.

The ``ge2e`` defaults live in config/ge2e-defaults.yaml, apart from config/default.yaml, so
that VoiceFilter configs and checkpoints are unchanged. A GE2E config file is read as
reverse_voicefilter.core.hparams reads any config (every section but ``ge2e`` merged over config/default.yaml,
strictly), and its ``ge2e`` section is merged over those defaults just as strictly: an
unknown key or a value of the wrong type is a UserError naming the file and the key.
"""
from pathlib import Path

import yaml

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import Dotdict, HParam, flatten, read_config_text

GE2E_DEFAULTS = Path(__file__).resolve().parent.parent / "config" / "ge2e-defaults.yaml"
SECTION = "ge2e"


def _documents(text, source):
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from None
    merged = {}
    for doc in docs:
        if not isinstance(doc, dict):
            raise UserError(f"{source}: each YAML document must be a mapping of sections")
        merged.update(doc)
    return merged


def _same_type(default, value):
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _merge_section(user, source):
    defaults = _documents(GE2E_DEFAULTS.read_text(), str(GE2E_DEFAULTS))[SECTION]
    if not isinstance(user, dict):
        raise UserError(f"{source}: '{SECTION}' must be a section of keys, got {user!r}")
    merged = dict(defaults)
    for key, value in user.items():
        if key not in defaults:
            raise UserError(f"{source}: unknown key '{SECTION}.{key}' (known here: {', '.join(sorted(defaults))})")
        if not _same_type(defaults[key], value):
            raise UserError(f"{source}: '{SECTION}.{key}' must be {type(defaults[key]).__name__}, got {value!r} "
                            f"({type(value).__name__})")
        merged[key] = float(value) if isinstance(defaults[key], float) else value
    return merged


def load_ge2e_config(path=None, text=None):
    """An :class:`HParam` with the default sections and ``hp.ge2e``, from a file or (``text``) a
    checkpoint's ``hp_str``; ``hp.hp_str`` holds all of it."""
    if text is None:
        text = read_config_text(path)
    source = str(path) if path is not None else "the checkpoint's config"
    sections = _documents(text, source)
    ge2e = _merge_section(sections.pop(SECTION, {}), source)
    rest = "---\n".join(yaml.safe_dump({k: v}, sort_keys=False) for k, v in sections.items())
    try:
        hp = HParam(text=rest)
    except UserError as err:  # reverse_voicefilter.core.hparams names the text it was given: name the file instead
        raise UserError(str(err).replace("config text", source, 1)) from None
    hp.ge2e = Dotdict(ge2e)
    return hp


def ge2e_config_changes(old_hp_str, hp, sections, ignore=()):
    """``[(key, old, new)]`` where a checkpoint's config and ``hp`` differ within ``sections``."""
    old = load_ge2e_config(text=old_hp_str)

    def flat(h):
        return flatten({name: h[name].to_dict() for name in sections})
    before, after = flat(old), flat(hp)
    return [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and k not in ignore]
