"""Generate VoiceFilter training and test mixtures from LibriSpeech (or VoxCeleb).

    python generator.py -c CONFIG -d LIBRI_DIR -o OUT_DIR -p PROCESSES --reverse_data False
    python generator.py -c CONFIG --tuples librispeech_dev_tuples.csv -d LIBRI_DIR -o OUT_DIR   # the paper's test set

Writes exactly --train_size / --test_size samples into OUT_DIR/train and
OUT_DIR/test; the same command gives byte-identical files whatever -p, and a
killed run is finished by running the same command again. One generator at a time
writes into an OUT_DIR: a second is refused while the first lives.
"""
import argparse
import signal

from reverse_voicefilter.core.cli import UserErrorParser, add_bool_flag, new_folders, setup_console_logging
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.runlock import folder_lock
from reverse_voicefilter.data.generation import default_processes, generate
from reverse_voicefilter.data.speakers import DEFAULT_TEST_SUBSETS, DEFAULT_TRAIN_SUBSETS, read_speaker_list


def build_parser():
    p = UserErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="yaml config (audio, data.audio_len, form)")
    p.add_argument("-d", "--libri_dir", default=None, help="LibriSpeech root holding the subset folders")
    p.add_argument("-v", "--voxceleb_dir", default=None,
                   help="VoxCeleb root (one folder per speaker) instead of -d; the last 20 speakers are the test set")
    p.add_argument("-o", "--out_dir", required=True, help="output folder (gets train/ and test/)")
    p.add_argument("-p", "--process_num", type=int, default=default_processes(),
                   help="worker processes (default: all cores)")
    add_bool_flag(p, "--reverse_data", help="write the interfering voice as the target (the reverse task); "
                                            "the same seed gives the same mixtures either way")
    add_bool_flag(p, "--vad", help="1: keep only the non-silent parts of target and interference (default 0)")
    p.add_argument("--train_size", type=int, default=40, help="training samples (default 40)")
    p.add_argument("--test_size", type=int, default=20, help="test samples (default 20)")
    add_bool_flag(p, "--only_dev", help="also train on the test speakers (train and test then share speakers)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train_subsets", nargs="+", default=list(DEFAULT_TRAIN_SUBSETS), metavar="SUBSET",
                   help=f"LibriSpeech training subsets (default: {' '.join(DEFAULT_TRAIN_SUBSETS)})")
    p.add_argument("--test_subsets", nargs="+", default=list(DEFAULT_TEST_SUBSETS), metavar="SUBSET",
                   help=f"LibriSpeech test subsets (default: {' '.join(DEFAULT_TEST_SUBSETS)})")
    add_bool_flag(p, "--exclude_test_speakers", default=True,
                  help="never train on a test speaker (default True; --only_dev overrides it)")
    p.add_argument("--holdout_speakers", default=None, metavar="FILE",
                   help="text file of speaker ids (one per line) never used for training")
    add_bool_flag(p, "--float16", help="store the .pt spectrograms as float16 (half the disk)")
    p.add_argument("--input_glob", default=None, metavar="PATTERN",
                   help="utterance files to use (default: the config's form.input, '*-norm.wav')")
    add_bool_flag(p, "--progress", default=True, help="show progress bars (default True)")
    g = p.add_argument_group("Google's official test set")
    g.add_argument("--tuples", default=None, metavar="FILE",
                   help="write the test split from these triplets (librispeech_dev_tuples.csv) as the paper "
                        "mixed them, from the .flac files under -d (dev-clean and dev-other); --test_size N "
                        "takes the first N rows (default: all)")
    add_bool_flag(g, "--skip_missing", help="with --tuples: leave out (and count) rows naming an utterance "
                                            "that is not under -d, instead of stopping")
    return p


# Flags of the drawn mixtures that mean nothing for the fixed official triplets.
NOT_WITH_TUPLES = ("voxceleb_dir", "train_size", "vad", "only_dev", "seed", "train_subsets", "test_subsets",
                   "exclude_test_speakers", "holdout_speakers")


def given_flags(parser, argv):
    """The destinations of the flags the command line sets (whatever their value)."""
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def run_official(args, hp, given):
    """``--tuples``: the official test set into OUT/test."""
    from reverse_voicefilter.data.official import generate_official
    stray = [name for name in NOT_WITH_TUPLES if name in given]
    if stray:
        raise UserError(f"--{stray[0]} does not apply to --tuples: the official test set is fixed by its "
                        f"triplets (leave the flag out)")
    generate_official(hp, args.tuples, args.libri_dir, args.out_dir,
                      test_size=args.test_size if "test_size" in given else None, skip_missing=args.skip_missing,
                      reverse=args.reverse_data, float16=args.float16, processes=args.process_num,
                      input_glob=args.input_glob, progress=args.progress)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill): stop the workers cleanly, as Ctrl-C does


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    hp = HParam(args.config)
    if args.skip_missing and not args.tuples:
        raise UserError("--skip_missing goes with --tuples (the official test set)")
    # one generator at a time in -o: a second would remove the first's temporaries as stale
    with new_folders(args.out_dir, flag="-o"), folder_lock(args.out_dir, "-o"):
        if args.tuples:
            run_official(args, hp, given_flags(parser, argv))
            return 0
        holdout = read_speaker_list(args.holdout_speakers) if args.holdout_speakers else ()
        generate(
            hp, args.libri_dir, args.out_dir, train_size=args.train_size, test_size=args.test_size,
            processes=args.process_num, reverse=args.reverse_data, seed=args.seed, vad=args.vad,
            only_dev=args.only_dev, vox_dir=args.voxceleb_dir, train_subsets=args.train_subsets,
            test_subsets=args.test_subsets, exclude_test_speakers=args.exclude_test_speakers, holdout=holdout,
            float16=args.float16, input_glob=args.input_glob, progress=args.progress,
        )
    # the closing summary of each split is generate()'s last log line
    return 0


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
