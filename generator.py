"""Generate VoiceFilter training and test mixtures from LibriSpeech (or VoxCeleb).

    python generator.py -c CONFIG -d LIBRI_DIR -o OUT_DIR -p PROCESSES --reverse_data False
"""
import logging
import os
from pathlib import Path

from datasets.generation import DEFAULT_TEST_SUBSETS, DEFAULT_TRAIN_SUBSETS, generate
from utils.cli import UserErrorParser, add_bool_flag, setup_console_logging
from utils.errors import UserError, run_cli
from utils.hparams import HParam


def parse_args(argv):
    p = UserErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="yaml config")
    p.add_argument("-d", "--libri_dir", default=None, help="LibriSpeech root (holding train-clean-100/, dev-clean/...)")
    p.add_argument("-v", "--voxceleb_dir", default=None, help="VoxCeleb2 root instead of LibriSpeech")
    p.add_argument("-o", "--out_dir", required=True, help="output folder (gets train/ and test/)")
    p.add_argument("-p", "--process_num", type=int, default=os.cpu_count(), help="worker processes (all cores)")
    add_bool_flag(p, "--reverse_data", help="the interfering voice becomes the target (the reverse task)")
    p.add_argument("--vad", type=int, choices=[0, 1], default=0, help="1: keep only non-silent parts")
    p.add_argument("--train_size", type=int, default=40)
    p.add_argument("--test_size", type=int, default=20)
    add_bool_flag(p, "--only_dev", help="also train on the test speakers (train and test then share speakers)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical output")
    p.add_argument("--train_subsets", nargs="+", default=list(DEFAULT_TRAIN_SUBSETS))
    p.add_argument("--test_subsets", nargs="+", default=list(DEFAULT_TEST_SUBSETS))
    p.add_argument("--holdout_speakers", default=None,
                   help="file of speaker ids (one per line) never used for training")
    add_bool_flag(p, "--float16", help="store spectrograms as float16 (half the disk)")
    return p.parse_args(argv)


def main(argv=None):
    setup_console_logging()
    args = parse_args(argv)
    if not args.libri_dir and not args.voxceleb_dir:
        raise UserError("give the data folder with -d LIBRI_DIR (or -v VOXCELEB_DIR)")
    hp = HParam(args.config)
    holdout = ()
    if args.holdout_speakers:
        path = Path(args.holdout_speakers)
        if not path.is_file():
            raise UserError(f"hold-out speaker list not found: {path}")
        holdout = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    summaries = generate(
        hp, args.libri_dir, args.out_dir, train_size=args.train_size, test_size=args.test_size,
        processes=args.process_num, reverse=args.reverse_data, seed=args.seed, vad=bool(args.vad),
        only_dev=args.only_dev, vox_dir=args.voxceleb_dir, train_subsets=args.train_subsets,
        test_subsets=args.test_subsets, holdout=holdout, float16=args.float16,
    )
    for s in summaries:
        drops = ", ".join(f"{v} {k}" for k, v in sorted(s["dropped"].items())) or "none"
        print(f"{s['split']}: {s['made'] + s['reused']} samples ({s['made']} made, {s['reused']} already there); "
              f"dropped candidates: {drops}")
    logging.getLogger(__name__).info("done: %s", Path(args.out_dir))
    return 0


if __name__ == "__main__":
    run_cli(main)
