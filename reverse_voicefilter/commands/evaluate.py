"""Score a trained VoiceFilter on a generator test folder: SDR, SI-SDR and speaker similarity.

    python evaluate.py [-c CONFIG] -e EMBEDDER --checkpoint_path CKPT -d TEST_DIR -o OUT_DIR \
        [--mask org|inv_div|inv_sub|all] [--factor 0.7] [--limit N] [--jobs N]

Writes OUT_DIR/report.json (per-mode medians and means), OUT_DIR/per_sample.csv (one row
per sample and mode), OUT_DIR/sdr_before_after.png, and prints a table. org is scored against
the speaker the model keeps (the reference speaker, or the interfering one for a model trained
on reversed data), the inverse modes against the other one. Any folder in the trainer's format
works, with utterances of any length (Google's official test set: generator.py --tuples); the
scoring is the trainer's validation's (reverse_voicefilter/evaluation/scoring.py). One evaluation
at a time writes into an OUT_DIR: a second is refused while the first lives.
"""
import argparse
import logging
import os
import sys

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
from reverse_voicefilter.core.runlock import folder_lock
from reverse_voicefilter.core.threads import configure as configure_threads
from reverse_voicefilter.separation.options import (
    BATCH_SIZE,
    DEFAULT_FACTOR,
    INV_DIV_EPS,
    add_mask_arguments,
    add_model_arguments,
    add_speed_arguments,
    non_negative_int,
    output_folder,
    parse_modes,
    positive_float,
    positive_int,
)


def build_parser():
    p = UserErrorParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p)
    p.add_argument("-d", "--test_dir", default=None,
                   help="a test folder written by generator.py (None: the config's data.test_dir)")
    p.add_argument("-o", "--out_dir", required=True, help="where report.json, per_sample.csv and "
                                                          "sdr_before_after.png go")
    add_mask_arguments(p, default="all", help="mask mode(s) to score")
    p.add_argument("--factor", type=positive_float, default=DEFAULT_FACTOR, help="factor of the inverse masks (> 0)")
    p.add_argument("--inv_div_eps", type=positive_float, default=INV_DIV_EPS,
                   help="inv_div divides by max(mask, eps)")
    add_device_flag(p)
    add_speed_arguments(p)
    p.add_argument("--limit", type=non_negative_int, default=0, help="score the first N samples only (0: all)")
    p.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE, help="samples per network call")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="processes scoring the samples (separation and SDR; default: up to the CPU cores)")
    add_bool_flag(p, "--reversed", default=None,
                  help="the model was trained on reversed data, so org keeps the interfering speaker (default: "
                       "what the training folder named in the checkpoint's config says, else the test folder)")
    add_threads_flag(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


# What earlier versions left behind when killed while writing report.json or per_sample.csv.
LEGACY_TEMPORARIES = (".json.tmp", ".csv.tmp")


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)  # before torch loads: its OpenMP reads the wait policy then
    setup_console_logging(logging.INFO if args.verbose else logging.WARNING)
    log = logging.getLogger("evaluate")
    hp = HParam(args.config) if args.config else None  # else the checkpoint's, once torch is loaded
    if hp is not None and not (args.test_dir or hp.data.test_dir):
        raise UserError("no test folder: pass -d TEST_DIR or set data.test_dir in the config")
    if args.jobs > (os.cpu_count() or 1):
        log.warning("--jobs %d is more than the %d CPU cores", args.jobs, os.cpu_count())
    modes = parse_modes(args.mask)
    # before any compute: a bad -o is one line, not a lost run; and one evaluation at a time in -o,
    # or a second would remove the first's temporaries as stale and both would write the report
    with output_folder(args.out_dir, "-o"), folder_lock(args.out_dir, "-o"):
        for path in remove_stale_temporaries(args.out_dir, legacy_suffixes=LEGACY_TEMPORARIES):
            log.info("removed %s, left by an interrupted run", path)
        device = pick_device(args.device)
        from reverse_voicefilter.evaluation.evaluate import format_table, run_evaluation
        from reverse_voicefilter.separation.loading import load_separator

        apply_threads(args.threads, log)
        separator = load_separator(hp, args.checkpoint_path, args.embedder_path, device, config_path=args.config,
                                   precision=args.precision, channels_last=args.channels_last,
                                   batch_size=args.batch_size, eps=args.inv_div_eps)
        test_dir = args.test_dir or separator.hp.data.test_dir
        if not test_dir:
            raise UserError("no test folder: pass -d TEST_DIR (the checkpoint's config names no data.test_dir)")
        meta = {"config": separator.source.config, "checkpoint": str(args.checkpoint_path),
                "embedder": str(args.embedder_path), "embedder_name": separator.embedder.name, "device": str(device),
                "precision": args.precision, "channels_last": separator.model.channels_last}
        report = run_evaluation(separator, test_dir, args.out_dir, modes, args.factor, limit=args.limit,
                                reversed_flag=args.reversed, jobs=args.jobs, progress=True, meta=meta)
    print(format_table(report["modes"], report["org_scored_against"]))
    print(f"{report['counts']['samples']} samples of {test_dir} in {report['seconds']} s; "
          f"report: {os.path.join(args.out_dir, 'report.json')}")
    for sample, why in report["failed_samples"].items():
        print(f"failed: sample {sample}: {why}", file=sys.stderr)
    if report["failed_samples"]:
        print(f"error: {len(report['failed_samples'])} sample(s) could not be scored; the report covers the "
              f"other {report['counts']['samples']}", file=sys.stderr)
        return 1
    return 0


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
