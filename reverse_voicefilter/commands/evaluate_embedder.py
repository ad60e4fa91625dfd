"""Score a speaker embedder by equal error rate:
``python evaluate_embedder.py -e FILE|resemblyzer (-d SPEAKERS_FOLDER | --trials LIST) -o OUT_DIR``.

``-d``: a folder of speaker folders (e.g. LibriSpeech's test-other); every same-speaker and
different-speaker pair of their utterances is a trial, or ``--sample N`` of each kind drawn
with ``--seed``. ``--trials``: a VoxCeleb1-style list, ``label path1 path2`` per line
(paths relative to ``--root``, by default the list's folder). Each utterance is embedded once,
as the d-vector ``-e`` gives everywhere else (the mean of its window/partial embeddings);
trials are scored by cosine. Writes ``OUT_DIR/report.json`` and ``OUT_DIR/scores.png`` (score
histograms) or ``OUT_DIR/det.png`` (``--plot det``).
"""
import logging
import time

from reverse_voicefilter.core.cli import (
    UserErrorParser,
    add_device_flag,
    add_threads_flag,
    apply_threads,
    check_writable_dir,
    pick_device,
    setup_console_logging,
)
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import DEFAULT_CONFIG
from reverse_voicefilter.core.threads import configure as configure_threads
from reverse_voicefilter.embedding.config import load_ge2e_config

logger = logging.getLogger("evaluate_embedder")


def build_parser():
    parser = UserErrorParser(description="Equal error rate of a speaker embedder on speaker folders or a trial list.")
    parser.add_argument("-e", "--embedder_path", required=True,
                        help="an embedder file (the original's embedder.pt, or one embedder_trainer.py wrote) "
                             "or 'resemblyzer'")
    parser.add_argument("-c", "--config", default=None,
                        help="config whose embedder section sizes an original-format file "
                             "(default: config/default.yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--data_dir", help="a folder of speaker folders: all (or --sample) pairs are trials")
    source.add_argument("--trials", help="a trial list: 'label path1 path2' lines, label 1 same / 0 different")
    parser.add_argument("--root", default=None, help="folder the trial list's paths are relative to (default: its own)")
    parser.add_argument("--input_glob", default="*.flac", help="audio files of a speaker folder (default: *.flac)")
    parser.add_argument("--utterances", type=int, default=0, help="at most this many per speaker, sorted (0: all)")
    parser.add_argument("--sample", type=int, default=0,
                        help="with -d: draw this many same and this many different pairs (0: every pair)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    parser.add_argument("--plot", choices=["histogram", "det"], default="histogram", help="the picture to write")
    parser.add_argument("-o", "--out_dir", required=True, help="folder for report.json and the picture")
    add_device_flag(parser)
    add_threads_flag(parser)
    return parser


def folder_speakers(folder, pattern, limit):
    from pathlib import Path

    from reverse_voicefilter.data.speakers import find_speakers

    if not Path(folder).is_dir():
        raise UserError(f"-d folder not found: {folder}")
    speakers = find_speakers([folder], pattern)
    if len(speakers) < 2:
        raise UserError(f"-d {folder}: found {len(speakers)} speaker folder(s) with two or more '{pattern}' files; "
                        f"an EER needs at least two (check --input_glob)")
    return {k: v[:limit or None] for k, v in speakers.items()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)  # before torch loads: its OpenMP reads the wait policy then
    setup_console_logging()
    for flag in ("utterances", "sample"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 or more")
    hp = load_ge2e_config(args.config or DEFAULT_CONFIG)  # a VoiceFilter config, or a GE2E one
    out_dir = check_writable_dir(args.out_dir, "-o")

    from reverse_voicefilter.embedding.eer import evaluate_trials, folder_trials, read_trials
    from reverse_voicefilter.embedding.report import save_det_curve, save_score_histogram, write_report
    from reverse_voicefilter.model.embedder import load_embedder

    if args.trials:
        trials = read_trials(args.trials, args.root)
        source = {"trials": str(args.trials)}
    else:
        speakers = folder_speakers(args.data_dir, args.input_glob, args.utterances)
        trials = folder_trials(speakers, sample=args.sample, seed=args.seed)
        source = {"data_dir": str(args.data_dir), "speakers": len(speakers), "input_glob": args.input_glob,
                  "utterances_per_speaker": args.utterances or None, "sample": args.sample, "seed": args.seed}
    apply_threads(args.threads, logger)
    device = pick_device(args.device)
    embedder = load_embedder(args.embedder_path, hp, device)
    start = time.perf_counter()
    result = evaluate_trials(embedder, trials, progress=True)
    meta = {"embedder": str(args.embedder_path), "embedder_name": embedder.name, **source, "device": str(device),
            "seconds": round(time.perf_counter() - start, 2)}
    write_report(out_dir / "report.json", result, meta)
    picture = out_dir / ("det.png" if args.plot == "det" else "scores.png")
    (save_det_curve if args.plot == "det" else save_score_histogram)(picture, result)
    print(f"EER {100 * result['eer']:.2f} % over {result['same_trials']} same-speaker and "
          f"{result['different_trials']} different-speaker trials ({result['utterances']} utterances); "
          f"{out_dir / 'report.json'}, {picture}")
    return 0


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
