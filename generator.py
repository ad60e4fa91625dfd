"""Generate VoiceFilter training and test mixtures from LibriSpeech (or VoxCeleb).

    python generator.py -c CONFIG -d LIBRI_DIR -o OUT_DIR -p PROCESSES --reverse_data False

Writes exactly --train_size / --test_size samples into OUT_DIR/train and
OUT_DIR/test; the same command gives byte-identical files whatever -p, and a
killed run is finished by running the same command again.
"""
import signal

from datasets.generation import default_processes, generate
from datasets.speakers import DEFAULT_TEST_SUBSETS, DEFAULT_TRAIN_SUBSETS, read_speaker_list
from utils.cli import UserErrorParser, add_bool_flag, setup_console_logging
from utils.errors import run_cli
from utils.hparams import HParam


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
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, kill): stop the workers cleanly, as Ctrl-C does


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_console_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    hp = HParam(args.config)
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


if __name__ == "__main__":
    run_cli(main)
