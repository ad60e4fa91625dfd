"""GE2E configs: the sections of config/default.yaml plus a ``ge2e`` section.

The ``ge2e`` defaults live in config/ge2e-defaults.yaml, apart from config/default.yaml, so
that VoiceFilter configs and checkpoints are unchanged (trainer.py and inference.py refuse a
``ge2e`` section as an unknown key). A GE2E config is read by core.hparams' one merge with that
file as one more defaults file: strictly, an unknown key or a value of the wrong type or out of
its range is a UserError naming the file and the key.
"""
from pathlib import Path

from reverse_voicefilter.core.hparams import HParam, config_changes

GE2E_DEFAULTS = Path(__file__).resolve().parent.parent / "config" / "ge2e-defaults.yaml"


def load_ge2e_config(path=None, text=None):
    """An :class:`HParam` with the default sections and ``hp.ge2e``, from a file or (``text``) a
    checkpoint's ``hp_str``; ``hp.hp_str`` holds all of it."""
    source = None if path is not None else "the checkpoint's config"
    return HParam(path, text=text, source=source, extra_defaults=(GE2E_DEFAULTS,))


def ge2e_config_changes(old_hp_str, hp, sections, ignore=()):
    """``[(key, old, new)]`` where a checkpoint's config and ``hp`` differ within ``sections``."""
    return config_changes(old_hp_str, hp, sections, extra_defaults=(GE2E_DEFAULTS,), ignore=ignore)
