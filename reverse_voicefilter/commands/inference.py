"""Keep (or remove) the reference speaker's voice in mixtures with a trained VoiceFilter.

    python inference.py [-c CONFIG] -e EMBEDDER --checkpoint_path CKPT -m MIXED.wav -r REFERENCE.wav \
        -o OUT_DIR --mask org|inv_div|inv_sub|all [--factor 0.7]

One mixture writes OUT_DIR/result.wav (float WAV); several (-m a.wav b.wav, or a folder)
write OUT_DIR/<name>-result.wav each. See reverse_voicefilter/separation/separator.py for the mask modes.

Exit status: 0 when every mixture was separated; 1 when some could not be (each named on
stderr, the others written) or the disk filled up (the results written before are kept); 2 when
none could be, or for a user error (a bad flag or file, or an output that would overwrite an input).
"""
import argparse
import logging
import os
import sys
import time

from reverse_voicefilter.core.atomic import remove_stale_temporaries
from reverse_voicefilter.core.cli import (
    UserErrorParser,
    add_bool_flag,
    add_device_flag,
    add_threads_flag,
    apply_threads,
    pick_device,
    setup_console_logging,
)
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.startup import bulk_imports, freeze_at_exit
from reverse_voicefilter.core.threads import configure as configure_threads
from reverse_voicefilter.separation.options import (
    BATCH_SIZE,
    CHUNK_SECONDS,
    DEFAULT_FACTOR,
    INV_DIV_EPS,
    OVERLAP_SECONDS,
    add_mask_arguments,
    add_model_arguments,
    add_speed_arguments,
    expand_inputs,
    non_negative_float,
    output_folder,
    output_plan,
    pair_references,
    parse_modes,
    positive_float,
    positive_int,
)


def build_parser():
    p = UserErrorParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p)
    p.add_argument("-m", "--mixed_file", nargs="+", action="extend", required=True, metavar="MIXED",
                   help="mixture file(s) or folder(s) of audio files (wav, flac, ogg, mp3...; any rate, "
                        "any channels; of a generator folder, its *-mixed.wav only); repeatable")
    p.add_argument("-r", "--reference_file", nargs="+", action="extend", required=True, metavar="REFERENCE",
                   help="reference recording of the speaker: one for all mixtures, or one per mixture")
    p.add_argument("-o", "--out_dir", required=True, help="output folder")
    add_mask_arguments(p, default="org",
                       help="org: est = mag*mask (keep the speaker); inv_div: est = factor*mag/max(mask, eps); "
                            "inv_sub: est = mag*(1-mask)/factor (both remove the speaker); all: one output each")
    p.add_argument("--factor", type=positive_float, default=DEFAULT_FACTOR,
                   help="factor of the inverse masks (> 0)")
    p.add_argument("--inv_div_eps", type=positive_float, default=INV_DIV_EPS,
                   help="inv_div divides by max(mask, eps): a guard against a mask of zero; bins whose mask "
                        "is under it come out at the spectrogram's ceiling, as they would without it")
    add_device_flag(p)
    add_speed_arguments(p)
    add_bool_flag(p, "--plot", default=False,
                  help="also write spectrogram pictures (mixture, mask, result) as result.png / NAME-result.png")
    p.add_argument("--chunk_seconds", type=non_negative_float, default=CHUNK_SECONDS,
                   help="process recordings longer than chunk + 2*overlap in chunks of this length "
                        "(bounded memory; 0: never)")
    p.add_argument("--overlap_seconds", type=non_negative_float, default=OVERLAP_SECONDS,
                   help="context on each side of a chunk; chunk outputs are crossfaded")
    p.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE,
                   help="most same-length mixtures per network call")
    add_threads_flag(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress to stderr: files, model, device, threads, timings")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)  # before torch loads: its OpenMP reads the wait policy then
    setup_console_logging(logging.INFO if args.verbose else logging.WARNING)
    log = logging.getLogger("inference")
    hp = HParam(args.config) if args.config else None  # else the checkpoint's, once torch is loaded
    modes = parse_modes(args.mask)
    inputs = expand_inputs(args.mixed_file, args.out_dir)
    references = pair_references(inputs, args.reference_file)
    output_plan(inputs, args.out_dir, modes, references)  # name clashes, overwritten inputs, a bad -o: before any work
    log.info("%d mixture(s), mask %s, output to %s", len(inputs), ", ".join(modes), args.out_dir)
    with output_folder(args.out_dir, "-o"):
        for path in remove_stale_temporaries(args.out_dir):  # a parallel run's own are kept
            log.info("removed %s, left by a run that was killed", path)
        imports = time.perf_counter()
        with bulk_imports():  # torch: only once the arguments are good
            from reverse_voicefilter.separation.files import separate_files
            from reverse_voicefilter.separation.loading import load_separator
        log.info("imports (torch, librosa, ...) in %.2f s", time.perf_counter() - imports)

        apply_threads(args.threads, log)
        separator = load_separator(hp, args.checkpoint_path, args.embedder_path, pick_device(args.device),
                                   config_path=args.config, precision=args.precision,
                                   channels_last=args.channels_last, chunk_seconds=args.chunk_seconds,
                                   overlap_seconds=args.overlap_seconds, batch_size=args.batch_size,
                                   eps=args.inv_div_eps)
        run = separate_files(separator, inputs, references, args.out_dir, modes, factor=args.factor,
                             plot=args.plot, progress=len(inputs) > 1, on_written=print_path)
    return report_failures(run.failed, len(inputs))


def print_path(path):
    """One written path on stdout, in the file system's own bytes when the console's encoding cannot
    spell it (``-o $'out_\\xff'`` on a UTF-8 system), so a pipe gets the name that opens the file."""
    line = f"{path}\n"
    try:
        sys.stdout.write(line)
        sys.stdout.flush()  # as it is written: a pipe or a log sees each result when it exists
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(line))
        sys.stdout.buffer.flush()


def report_failures(failed, total):
    """Name each mixture that could not be separated (one line each); the exit status."""
    if not failed:
        return 0
    reasons = set(failed.values())
    if len(failed) == total and len(reasons) == 1:
        raise UserError(reasons.pop())  # one cause (one input, or one shared reference): one line
    for path, reason in failed.items():
        print(f"failed: {path}: {reason}", file=sys.stderr)
    if len(failed) == total:
        raise UserError(f"none of the {total} mixtures could be separated")
    print(f"error: {len(failed)} of {total} mixtures could not be separated (named above); "
          f"the other {total - len(failed)} were written", file=sys.stderr)
    return 1


def console():
    """The command line's entry point (the root script and the installed command)."""
    from reverse_voicefilter.core.allocator import reuse_freed_memory

    reuse_freed_memory()  # fp32 activations reuse each other's memory (reverse_voicefilter/core/allocator.py)
    freeze_at_exit()
    run_cli(main)


if __name__ == "__main__":
    console()
