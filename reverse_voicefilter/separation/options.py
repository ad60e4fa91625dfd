"""What a user asks of the separation: mask modes, numeric flags, model flags, input and output files.

Kept free of torch and numpy so that ``inference.py --help``, a bad flag or a missing
file answer at once, before the deep-learning stack is imported (about 1.5 s).
"""
import argparse
import contextlib
import os
from pathlib import Path

from reverse_voicefilter.core.atomic import is_temporary
from reverse_voicefilter.core.cli import add_bool_flag, check_writable_dir
from reverse_voicefilter.core.errors import UserError

# The mask modes, named once: the flags' choices, the outputs' names and the evaluation's rows.
MASK_MODES = ("org", "inv_div", "inv_sub")
ALL_MODES = "all"
MASK_CHOICES = (*MASK_MODES, ALL_MODES)
DEFAULT_FACTOR = 0.7
# Floor of the mask in inv_div (factor * mag / max(mask, eps)). The parity
# fixture's smallest mask value is 0.45, far above it.
INV_DIV_EPS = 1e-3

# Long inputs: chunks of CHUNK_SECONDS of frames, each with OVERLAP_SECONDS of
# extra frames on both sides (the conv stack sees +-65 frames, the BLSTM the
# whole chunk), stitched in the waveform domain with a linear crossfade.
CHUNK_SECONDS = 30.0
OVERLAP_SECONDS = 3.0
BATCH_SIZE = 8

# A generator split holds NNNNNN-mixed.wav beside its clean -target.wav: only the former are mixtures.
GENERATOR_MIXTURE_SUFFIX = "-mixed.wav"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au",
                  ".snd", ".w64", ".caf", ".rf64"}


# ---- command-line value types (argparse ``type=``) -----------------------------------------------
def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_float(text):
    return _number(text, float, lambda v: v > 0, "a positive number")


def non_negative_float(text):
    return _number(text, float, lambda v: v >= 0, "zero or a positive number")


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, "at least 1")


def non_negative_int(text):
    return _number(text, int, lambda v: v >= 0, "zero or more")


# ---- mask modes --------------------------------------------------------------------------------
def parse_modes(text):
    """``'org'`` -> ['org']; ``'all'`` -> all three modes."""
    if text == ALL_MODES:
        return list(MASK_MODES)
    if text not in MASK_MODES:
        raise UserError(f"unknown mask mode {text!r} (use {', '.join(MASK_MODES)} or {ALL_MODES})")
    return [text]


def add_mask_arguments(parser, default, help):
    """``--mask`` with the choices :data:`MASK_CHOICES` (inference and evaluate)."""
    parser.add_argument("--mask", default=default, choices=MASK_CHOICES, help=help)


# ---- model flags -------------------------------------------------------------------------------
def add_model_arguments(parser):
    """The flags that name a trained model: ``-c``, ``-e``, ``--checkpoint_path`` (inference and evaluate).

    ``-e/--embedder_path`` is the trainer's flag; ``--embedder`` stays accepted as an alias."""
    parser.add_argument("-c", "--config", default=None,
                        help="the YAML config the model was trained with (default: the one stored in the "
                             "checkpoint)")
    parser.add_argument("-e", "--embedder_path", "--embedder", dest="embedder_path", default="resemblyzer",
                        help="an original-format embedder.pt, or 'resemblyzer' (pretrained, offline)")
    parser.add_argument("--checkpoint_path", required=True,
                        help="a trainer checkpoint (chkpt_STEP.pt or best.pt)")


def add_speed_arguments(parser):
    """The network's numerics: ``--precision`` and ``--channels_last`` (inference and evaluate)."""
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: autocast the network (not the STFTs) to bfloat16; fast on GPUs and on "
                             "CPUs with bfloat16 units (AVX512-BF16, AMX)")
    add_bool_flag(parser, "--channels_last", default=False,
                  help="run the convolutions in channels_last memory format (faster on CPUs, above all "
                       "with bf16; same results to float rounding); also on where the config sets train.channels_last")


# ---- files -------------------------------------------------------------------------------------
def result_names(stem, modes, many):
    """Output file names (without folder) per mode: result.wav, result_org.wav, x-result.wav, ..."""
    base = f"{stem}-result" if many else "result"
    if len(modes) == 1:
        return {modes[0]: f"{base}.wav"}
    return {m: f"{base}_{m}.wav" for m in modes}


def expand_inputs(paths, out_dir=None):
    """Files and folders (every audio file in them, sorted) -> a list of files.

    A folder the generator wrote (it holds ``*-mixed.wav``) gives its mixtures only, not the
    clean ``-target.wav`` beside them. Files of a folder that are this program's own results
    in ``out_dir`` are left out, so a rerun into the input folder does not separate its
    outputs again; so are the temporaries of a run writing there (``.NAME.pid....tmp.wav``).
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not is_temporary(p.name))
            mixtures = [p for p in found if p.name.endswith(GENERATOR_MIXTURE_SUFFIX)]
            if mixtures:
                found = mixtures
            if out_dir is not None and path.resolve() == Path(out_dir).resolve():
                found = [p for p in found if not is_result_name(p.stem)]
            if not found:
                raise UserError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"audio file not found: {path}")
    return files


def is_result_name(stem):
    """Whether a file stem is one of :func:`result_names`' outputs."""
    return stem == "result" or stem.startswith("result_") or "-result" in stem


@contextlib.contextmanager
def output_folder(path, flag="-o"):
    """Make ``path`` and prove it writable before any work (one line, exit 2, when it is not);
    a folder this run created is removed again if the run ends with nothing in it."""
    path = Path(path)
    created = not path.exists()
    check_writable_dir(path, flag)
    try:
        yield path
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def pair_references(inputs, references):
    """One reference for all inputs, or one per input (paired in order)."""
    references = [Path(r) for r in references]
    if len(references) == 1:
        return references * len(inputs)
    if len(references) != len(inputs):
        raise UserError(f"{len(references)} references for {len(inputs)} mixtures: give one -r for all, "
                        f"or one per mixture")
    return references


def output_plan(inputs, out_dir, modes, references=()):
    """``[(input, {mode: output path}, picture path)]``; two inputs with one name are an error,
    and so is a result that would overwrite one of the ``inputs`` or ``references``."""
    many = len(inputs) > 1
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} is a file")
    seen = {}
    plan = []
    for path in inputs:
        if many and path.stem in seen:
            raise UserError(f"two mixtures would write the same output name: {seen[path.stem]} and {path} "
                            f"(rename one, or run them separately)")
        seen[path.stem] = path
        names = result_names(path.stem, modes, many)
        picture = out_dir / (f"{path.stem}-result.png" if many else "result.png")
        plan.append((path, {m: out_dir / name for m, name in names.items()}, picture))
    refuse_overwriting_inputs(plan, inputs, references)
    return plan


def _file_id(path):
    """The file behind ``path`` (device, inode), so that a link or another spelling of an input is
    recognised too; None for a path that names no file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not st.st_ino:  # a file system without inode numbers (FAT on Windows): the resolved name
        return os.path.normcase(os.path.realpath(path))
    return st.st_dev, st.st_ino


def refuse_overwriting_inputs(plan, inputs, references=()):
    """A result whose file is a mixture or a reference of the run (``-m OUT/result.wav -o OUT``)
    is a :class:`UserError`, before any work: the result would replace the input it came from.
    Pictures are left out: an input is audio, never a PNG."""
    given = {}
    for role, paths in (("reference", references), ("mixture", inputs)):  # a mixture's name wins
        for path in paths:
            key = _file_id(path)
            if key is not None:
                given[key] = (role, path)
    for _, outputs, _ in plan:
        for out_path in outputs.values():
            clash = given.get(_file_id(out_path))
            if clash:
                role, path = clash
                raise UserError(f"the result {out_path} would overwrite the {role} {path}: choose another "
                                f"output folder (-o) or rename the input")
