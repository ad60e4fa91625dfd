"""Generator throughput: ``generator.py`` run as a user runs it, on real speech, per process count.

Variants (each a fresh ``generator.py`` into its own temporary folder):

* ``p1``          ``-p 1`` (the baseline: everything in one process);
* ``p2``          ``-p 2`` (two worker processes);
* ``p2-float16``  ``-p 2 --float16 True`` (spectrograms stored as float16: half the disk).

Data: ``../shared/data/librispeech-mini`` (``--data``). Its train-clean-100 subset has one
utterance per speaker, too few for a training split, so both splits draw from test-other
(10 speakers x 10 utterances; ``--exclude_test_speakers False``), read as FLAC
(``--input_glob '*.flac'``). Without that folder the synthetic demo corpus
(``python -m reverse_voicefilter.prepare.demo_corpus``) is written to a temporary folder first, and the table says so.

Figures: samples/s over the whole command (start-up, speaker scan, pool, both splits), the
start-up-free rate of the training split that the generator logs (``train: N samples in ...,
R samples/s``: from the first sample job to the last), and memory: the peak of the summed
PSS of the generator and its workers (sampled every 0.2 s; shared pages counted once) and
the largest peak RSS of any one of them (all the work with -p 1; the main process or a worker
with -p 2).

Duration at the defaults (config/default.yaml, 200 + 10 samples) on the 2-core development
machine: about 30 s per variant, 1-2 minutes in all (40 samples took 8.5 s with -p 1).
``--quick``: config/tiny.yaml, 20 + 2 samples, under a minute in all.

    .venv/bin/python -m reverse_voicefilter.bench.generator
    .venv/bin/python -m reverse_voicefilter.bench.generator --train_size 1000 --json gen.json
"""
import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from reverse_voicefilter.bench import common

VARIANTS = {  # name: extra generator.py flags
    "p1": ["-p", "1"],
    "p2": ["-p", "2"],
    "p2-float16": ["-p", "2", "--float16", "True"],
}
# the generator's summary log line: "train: 200 samples in DIR (200 made, 0 already there, 12.3 samples/s); ..."
RATE_LINE = re.compile(r"\b(train|test): (\d+) samples in .*?\((\d+) made, \d+ already there"
                       r"(?:, ([\d.]+) samples/s)?\)")


def parse_args():
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config (default config/default.yaml; --quick: config/tiny.yaml)")
    p.add_argument("--data", default=str(common.DEFAULT_DATA), help="LibriSpeech-layout folder (default: %(default)s)")
    p.add_argument("--train_size", type=int, default=None, help="training samples (default 200; --quick: 20)")
    p.add_argument("--test_size", type=int, default=None, help="test samples (default 10; --quick: 2)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # internal: the parent's scratch folder
    args = common.parse(p)
    args.config = args.config or str(common.PACKAGE / "config" / ("tiny.yaml" if args.quick else "default.yaml"))
    args.train_size = args.train_size if args.train_size is not None else (20 if args.quick else 200)
    args.test_size = args.test_size if args.test_size is not None else (2 if args.quick else 10)
    return args


def data_flags(corpus):
    """generator.py flags for the data: real LibriSpeech FLAC, or the demo corpus' -norm.wav files."""
    if corpus["kind"] == "librispeech-mini":
        return ["-d", corpus["dir"], "--input_glob", "*.flac", "--train_subsets", "test-other",
                "--test_subsets", "test-other", "--exclude_test_speakers", "False"]
    return ["-d", corpus["dir"]]  # the demo corpus has train-clean-100 and dev-clean, the defaults' names


def prepare_corpus(args, workdir):
    """``{"kind", "dir"}``: the real data when present, else a demo corpus written to ``workdir``."""
    if Path(args.data, "test-other").is_dir():
        return {"kind": "librispeech-mini", "dir": str(Path(args.data).resolve())}
    out = Path(workdir) / "demo_corpus"
    print(f"  {args.data} not found: writing the synthetic demo corpus to {out}", file=sys.stderr, flush=True)
    common.run_tool([sys.executable, "-m", "reverse_voicefilter.prepare.demo_corpus", "-o", out, "-q"])
    return {"kind": "synthetic demo corpus", "dir": str(out)}


def run_variant(args, name):
    corpus = json.loads(Path(args.workdir, "corpus.json").read_text())
    # the output goes under the parent's scratch folder, which the parent removes even if this
    # process is killed at the timeout
    with tempfile.TemporaryDirectory(prefix=f"out_{name}_", dir=args.workdir) as out:
        cmd = [sys.executable, "generator.py", "-c", args.config, "-o", out, *data_flags(corpus),
               "--train_size", str(args.train_size), "--test_size", str(args.test_size), "--progress", "False",
               *VARIANTS[name]]
        run = common.run_tool(cmd)
        disk_mb = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    rates = {m.group(1): float(m.group(4)) for m in RATE_LINE.finditer(run.err) if m.group(4)}
    total = args.train_size + args.test_size
    return {"seconds": run.seconds, "samples": total, "samples_per_s": total / run.seconds,
            "train_rate": rates.get("train"), "tree_pss_mb": round(run.tree_pss_mb, 1),
            "max_process_rss_mb": round(run.largest_rss_mb, 1), "disk_mb": round(disk_mb, 1),
            "load_1min": round(os.getloadavg()[0], 2), "command": " ".join(map(str, cmd))}


def main():
    args = parse_args()

    def prepare(workdir):
        corpus = prepare_corpus(args, workdir)
        print(f"generator benchmark: {args.config}, {args.train_size} + {args.test_size} samples from "
              f"{corpus['kind']}, timeout {args.timeout:g} s per variant", file=sys.stderr)
        return corpus

    common.run_benchmark(__spec__.name, args, run_variant, VARIANTS, "Generator throughput",
                         lambda results, corpus, _, __: summarize(args, results, corpus), prepare=prepare,
                         workdir_prefix="bench_corpus_", shared_file="corpus.json")


def summarize(args, results, corpus):
    """The table, notes and JSON payload of the results so far."""
    columns = [("wall s", "seconds"), ("samples/s (whole command)", "samples_per_s"),
               ("train samples/s (logged)", "train_rate"), ("peak PSS MB (all processes)", "tree_pss_mb"),
               ("largest one-process RSS MB", "max_process_rss_mb"), ("disk MB", "disk_mb"),
               ("load (1 min)", "load_1min")]
    ratios = [("speed vs p1", "samples_per_s", True), ("speed vs p1 (logged)", "train_rate", True),
              ("memory vs p1", "tree_pss_mb", False)]
    notes = [f"Data: {corpus['kind']} ({corpus['dir']}); config {Path(args.config).name}; {args.train_size} train + "
             f"{args.test_size} test samples per variant. The generator is CPU-only (--device does not apply). "
             f"Ratios: > 1 is better than -p 1 (faster, less memory)."]
    if corpus["kind"] != "librispeech-mini":
        notes.append(f"WARNING: {args.data} was not found: these figures are on synthetic speech.")
    table = common.markdown_table(results, columns, ratios, baseline="p1")
    return table, notes, {"args": vars(args), "corpus": corpus, "results": results}


if __name__ == "__main__":
    main()
