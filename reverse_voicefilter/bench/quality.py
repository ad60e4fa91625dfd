"""Separation quality on real voices: train from random weights for a fixed budget, score held-out speakers.

What the original's users ask first is what SDR they will get. This benchmark answers it on the
real speech of librispeech-mini (../shared/data/librispeech-mini), end to end through this
project's own code:

* data (reverse_voicefilter/bench/quality_data.py): training speakers are train-clean-100's 251, each one long
  utterance cut into pieces at its pauses; test speakers are test-other's 10 (100 utterances),
  never seen in training, mixed by the official-triplet path (``generator.py --tuples``: whole
  utterances, gain 1) from a triplet list drawn with ``--test_seed``, so the figure means what
  the paper's 2.5 -> 12.6 dB means;
* training: ``trainer.py`` from random weights with on-the-fly mixing (``data.mixing online``),
  ``--size tiny`` (config/tiny.yaml) or ``default`` (config/default.yaml), for ``--steps`` or
  ``--minutes``, a checkpoint every ``--eval_every`` steps; ``--seeds`` runs one model per seed;
* scoring: every checkpoint by evaluate.py's code (reverse_voicefilter.evaluation.evaluate) on the test folder: SDR and
  SI-SDR gains and the d-vector similarity, per mask mode, each scored against what the mode
  keeps. Both tasks of the project: keeping the reference speaker (``org``) and removing it,
  by the inverse masks of the normal model and (``--reverse``) by ``org`` of a model trained on
  reversed data (``data.reverse_data``).

The curve (the checkpoints on the first ``--curve_samples`` test mixtures) and the final table
(the last checkpoint on all of them) are printed, written to OUT/quality.json (and ``--json``)
and drawn in OUT/quality_curve.png. A run folder that finished is reused: a second invocation
with the same settings only scores (delete OUT/runs/NAME to train again). ``--resume`` continues a
run that was stopped (a crash, Ctrl-C, SIGTERM) from its latest checkpoint instead of starting it
over, and extends a run to a larger ``--steps`` where the learning rate does not depend on it; the
curve's minutes are training time, the pauses between the pieces left out.

    .venv/bin/python -m reverse_voicefilter.bench.quality --quick                 # < 2 min: a check that it works
    .venv/bin/python -m reverse_voicefilter.bench.quality --size tiny --minutes 30 --seeds 1 2 --reverse
    .venv/bin/python -m reverse_voicefilter.bench.quality --size default --device cuda --precision bf16 --minutes 5
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from reverse_voicefilter.core import threads as thread_choice

if __name__ == "__main__":
    # the scoring in this process beside running trainers: the load-aware thread count, idle threads
    # sleeping (read by OpenMP when torch loads); torch's default spinning threads made it 10x slower
    thread_choice.configure(None)

from reverse_voicefilter.bench import common, machine, quality_data, quality_report  # noqa: E402
from reverse_voicefilter.core.atomic import write_text  # noqa: E402
from reverse_voicefilter.core.checkpoint import NOT_HYPERPARAMETERS  # noqa: E402
from reverse_voicefilter.core.hparams import HParam, config_changes, dump, merge  # noqa: E402
from reverse_voicefilter.core.jsonfile import json_text, write_json  # noqa: E402

ROOT = common.ROOT
EMBEDDER = "resemblyzer"
MODES = ("org", "inv_sub", "inv_div")
SIZES = {name: f"reverse_voicefilter/config/{name}.yaml" for name in ("tiny", "small", "default")}
# Recipes compared by --recipe: the config changes on top of the size's config, given the run's
# --steps (docs/recipes.md)
RECIPES = {
    "original": lambda steps: {},
    "power-law": lambda steps: {"train": {"loss": "power_law"}},
    # warm-up over the first tenth of --steps, then down to 5 % of the rate at the last step
    "warmup-cosine": lambda steps: {"train": {"lr_schedule": "warmup_cosine", "warmup_steps": max(1, steps // 10)}},
    # the demo's network (synthetic voices, 6000 steps, past its plateau) fine-tuned on the real pieces
    "warm-start": lambda steps: {},
    # the same warm start with the rate warmed up over a tenth of the run and decayed to 5 %: a
    # constant 1e-3 from the first step may undo what the demo's network learned before it adapts
    "warm-start-decay": lambda steps: {"train": {"lr_schedule": "warmup_cosine", "warmup_steps": max(1, steps // 10)}},
    # more from the little data: a window anywhere in each piece, the interference within +-6 dB
    "augment": lambda steps: {"data": {"crop": "random", "gain_db": 6.0}},
    # the interference 10 dB quieter at first, at its own level from a third of the run on
    "snr-curriculum": lambda steps: {"data": {"snr_start_db": 10.0, "snr_steps": max(1, steps // 3)}},
    # the d-vector also modulates every convolution block's output
    "film": lambda steps: {"model": {"film": True}},
}
# trainer.py flags of a recipe, beside its config changes
DEMO_CHECKPOINT = str(common.PACKAGE / "assets" / "demo-tiny-6000.pt")
RECIPE_FLAGS = {"warm-start": ["--init_from", DEMO_CHECKPOINT], "warm-start-decay": ["--init_from", DEMO_CHECKPOINT]}
POLL_SECONDS = 15  # how often a running trainer's folder is looked at for checkpoints to score


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="network and spectrogram size")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="training steps per model")
    budget.add_argument("--minutes", type=float, default=None,
                        help="training wall minutes per model (stopped by SIGTERM, which checkpoints)")
    p.add_argument("--eval_every", type=int, default=None, help="steps between checkpoints on the curve")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one model per seed (train.seed, mixing_seed)")
    p.add_argument("--reverse", action="store_true",
                   help="also train on reversed data (the removal task): --tasks normal reverse")
    p.add_argument("--tasks", nargs="+", choices=["normal", "reverse"], default=None,
                   help="which models to train: on normal data, on reversed data (default: normal)")
    p.add_argument("--recipe", nargs="+", default=["original"], choices=sorted(RECIPES),
                   help="training recipes to compare (docs/recipes.md)")
    p.add_argument("--score_only", action="store_true",
                   help="train nothing: gather and score the runs of this selection that finished before "
                        "(e.g. runs made in parallel, one per process); the others are left out")
    p.add_argument("--resume", action="store_true",
                   help="continue each run of this selection that stopped before --steps from its latest "
                        "checkpoint (the same config; --steps may be raised with a constant learning rate)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each trainer (default: torch's)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default: the size's config)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader processes of each trainer (train.num_workers; default: none on a CPU, where "
                        "they would take the training's cores, up to 8 on a GPU machine)")
    p.add_argument("--channels_last", action="store_true",
                   help="train with train.channels_last (the same model, a faster step on CPUs; "
                        "config/tiny.yaml has it on)")
    p.add_argument("--curve_samples", type=int, default=40, help="test mixtures scored at each curve point")
    p.add_argument("--final_samples", type=int, default=0,
                   help="test mixtures scored with the last checkpoint (0: all of them)")
    p.add_argument("--test_seed", type=int, default=0, help="seed of the test triplets")
    p.add_argument("--data", default=str(common.DEFAULT_DATA), help="librispeech-mini root")
    p.add_argument("-o", "--out", default=str(common.OUT / "quality"), help="work and result folder")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="SDR processes")
    p.add_argument("--quick", action="store_true",
                   help="tiny size, 6 steps, 12 test mixtures, one seed: a check that it works (< 2 min)")
    args = p.parse_args(argv)
    args.tasks = args.tasks or (["normal", "reverse"] if args.reverse else ["normal"])
    if args.quick:
        args.size = "tiny"
        if args.minutes is None:
            args.steps = args.steps or 6
        args.eval_every = args.eval_every or 3
        args.curve_samples = min(args.curve_samples, 12)
        args.final_samples = args.final_samples or args.curve_samples
    if args.steps is None and args.minutes is None:
        args.steps = 3000 if args.size == "tiny" else 2000
    if args.eval_every is None:
        args.eval_every = max(1, (args.steps or 1000) // 6)
    for name in ("steps", "eval_every", "curve_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    if {"warm-start", "warm-start-decay"} & set(args.recipe) and args.size != "tiny":
        p.error("--recipe warm-start starts from the demo's checkpoint, a tiny network: use --size tiny")
    for recipe in {"warmup-cosine", "warm-start-decay"} & set(args.recipe):
        if not args.steps:
            p.error(f"--recipe {recipe} needs --steps (its decay ends at the last step)")
    if args.minutes is not None and args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    return args


def run_config(args, libri_root, test_dir, seed, reverse, recipe):
    """The trainer's config (multi-document yaml) of one model: the size's config with the data,
    budget and recipe of this run merged over it (core.hparams' strict merge: a key that does not
    exist fails here, not in the trainer)."""
    changes = {
        "data": {"mixing": "online", "libri_dir": str(libri_root), "test_dir": str(test_dir),
                 "train_subsets": [quality_data.TRAIN_SUBSET], "test_subsets": [quality_data.TEST_SUBSET],
                 "input_glob": "*.wav", "mixing_seed": seed, "reverse_data": bool(reverse),
                 "epoch_samples": 4000},  # ~600 pieces: larger epochs run out of new triplets,
        "train": {"seed": seed, "precision": args.precision, "num_workers": args.workers,
                  "checkpoint_interval": args.eval_every, "summary_interval": max(1, args.eval_every // 10),
                  # the trainer's own validation only picks best.pt: a few mixtures keep it cheap
                  "validation_samples": min(8, args.curve_samples),
                  "max_steps": args.steps or 10 ** 7},
    }
    if args.batch_size:
        changes["train"]["batch_size"] = args.batch_size
    if args.channels_last:
        changes["train"]["channels_last"] = True
    sections = merge(HParam(ROOT / SIZES[args.size]).to_dict(), changes, "bench.quality")
    sections = merge(sections, RECIPES[recipe](args.steps or 0), f"--recipe {recipe}")
    return dump(sections)


def run_name(args, seed, reverse, recipe):
    return f"{args.size}-{recipe}-{'reverse' if reverse else 'normal'}-seed{seed}"


def resume_point(args, run_dir, config_text):
    """``--resume``: the latest checkpoint of a run stopped before ``--steps`` and the training
    segments (``[start, end]`` wall times) it had, or None where there is nothing to continue. Exits
    with one line where the run was made with another config: continuing it would mix two recipes."""
    found = quality_report.checkpoints(run_dir)
    config = run_dir / "config.yaml"
    if not found or not config.is_file():
        return None
    last = max(found)
    if args.steps and last >= args.steps:
        return None
    old_text = config.read_text()
    old, now = HParam.from_string(old_text), HParam.from_string(config_text)
    # what the trainer's own resume lets change (a larger --steps, the memory format, ...), except a
    # larger --steps where it moves the end of a decaying rate
    moved_end = now.train.lr_schedule != "constant" and old.train.max_steps != now.train.max_steps
    if config_changes(old_text, now, ignore=NOT_HYPERPARAMETERS) or moved_end:
        sys.exit(f"error: --resume: {run_dir.name} was trained with another config ({config}); "
                 "leave out --resume to train it again from the start")
    return found[last], quality_report.segments(run_dir)


def train(args, run_dir, config_text, device, recipe="original", on_checkpoint=None):
    """Train one model in ``run_dir`` (unless it finished before with the same config); returns the
    run's record: start and end times, training segments, exit code, steps. While the trainer runs,
    ``on_checkpoint(segments)`` is called every few seconds (scoring the checkpoints written so far,
    so that a run cut short still leaves its curve)."""
    record_path = run_dir / "run.json"
    resume = resume_point(args, run_dir, config_text) if args.resume else None
    if record_path.is_file() and resume is None:
        record = json.loads(record_path.read_text())
        if record.get("config") == config_text and record.get("budget") == [args.steps, args.minutes]:
            print(f"{run_dir.name}: trained before ({record['steps']} steps), scoring only", flush=True)
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    write_text(config, config_text)
    cmd = [sys.executable, str(ROOT / "trainer.py"), "-c", str(config), "-e", EMBEDDER, "-m", "model",
           "-b", str(run_dir), "--device", device]
    if resume is None:
        cmd += ["--overwrite", *RECIPE_FLAGS.get(recipe, [])]
        segments = []
    else:
        checkpoint, segments = resume
        cmd += ["--checkpoint_path", str(checkpoint)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    budget = f'{args.steps} steps' if args.steps else f'{args.minutes} min'
    print(f"{run_dir.name}: training ({budget})" if resume is None else
          f"{run_dir.name}: resuming from {resume[0].name} ({budget})", flush=True)
    start = time.time()
    segments = [*segments, [start, None]]
    write_json(run_dir / "segments.json", segments)
    with open(run_dir / "train.log", "w" if resume is None else "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = start + args.minutes * 60 if args.minutes else None
        try:
            while proc.poll() is None:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(cmd, args.minutes * 60)
                try:
                    proc.wait(timeout=POLL_SECONDS if left is None else min(POLL_SECONDS, left))
                except subprocess.TimeoutExpired:
                    if on_checkpoint is not None:
                        on_checkpoint(segments)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints the step it is at, then exits 143
            proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    end = time.time()
    segments[-1][1] = end
    write_json(run_dir / "segments.json", segments)
    checkpoints = quality_report.checkpoints(run_dir)
    if proc.returncode not in (0, 143) or not checkpoints:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-3:]
        sys.exit(f"error: the trainer of {run_dir.name} failed (exit {proc.returncode}): " + " | ".join(tail))
    record = {"config": config_text, "budget": [args.steps, args.minutes], "start": segments[0][0], "end": end,
              "segments": segments, "exit": proc.returncode, "steps": max(checkpoints), "threads": args.threads or None}
    write_json(record_path, record)
    return record


def scoring_threads(chosen, cores, trainer_threads, training):
    """The scoring's CPU threads: the load-aware choice made at start (``chosen``), less the cores of
    this process's own trainer while it runs (``trainer_threads``; 0: torch's default, all cores),
    which started after that choice and so is not in it."""
    if not training:
        return chosen
    return max(1, chosen - (trainer_threads or cores))


def _raise_on_sigterm(signum, frame):
    raise SystemExit(143)  # so train() stops its trainer (which checkpoints) instead of leaving it running


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    torch_device = common.pick(args.device)
    device = str(torch_device)
    chosen = None
    if torch_device.type == "cpu":  # the scoring's threads (each trainer has --threads)
        chosen = thread_choice.apply()
        print(f"scoring: {chosen} CPU thread(s) ({thread_choice.decide().reason}), "
              f"{scoring_threads(chosen, thread_choice.usable_cores(), args.threads, True)} while a trainer runs",
              flush=True)

    def set_scoring_threads(training):
        if chosen is not None:
            import torch

            torch.set_num_threads(scoring_threads(chosen, thread_choice.usable_cores(), args.threads, training))
    if args.workers is None:  # on a CPU the loader processes would take the training's cores
        args.workers = 0 if torch_device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine.describe_machine(torch_device)
    print(machine.machine_line(info), flush=True)
    data = quality_data.prepare(args.data, out / "data", ROOT / SIZES[args.size], args.size, args.test_seed,
                                jobs=args.jobs)
    print(quality_data.describe(data), flush=True)
    runs = []
    result = {"machine": info, "size": args.size, "steps": args.steps, "minutes": args.minutes,
              "precision": args.precision, "batch_size": args.batch_size, "workers": args.workers,
              "data": {**{k: v for k, v in data.items() if k != "libri_root"}, "test_dir": str(data["test_dir"])},
              "test_seed": args.test_seed, "curve_samples": args.curve_samples,
              "final_samples": args.final_samples or data["test_samples"], "runs": runs}

    def publish(partial=None):
        """quality.json (and --json) now: the finished runs, and the running one's curve so far, so a
        run stopped at its time limit still returns its figures."""
        text = json_text({**result, "finished": partial is None, "running": partial})
        write_text(out / "quality.json", text)
        if args.json:
            write_text(Path(args.json), text)

    for recipe in args.recipe:
        for reverse in [task == "reverse" for task in args.tasks]:
            for seed in args.seeds:
                name = run_name(args, seed, reverse, recipe)
                run_dir = out / "runs" / name
                text = run_config(args, data["libri_root"], data["test_dir"], seed, reverse, recipe)
                if args.score_only:
                    if not (run_dir / "run.json").is_file():
                        print(f"{name}: not trained, left out", flush=True)
                        continue
                    record = json.loads((run_dir / "run.json").read_text())
                else:
                    def score_so_far(segments, run_dir=run_dir, name=name):
                        set_scoring_threads(training=True)
                        curve = quality_report.score_curve(run_dir, segments, data["test_dir"], torch_device,
                                                           args.curve_samples, args.jobs, MODES)
                        write_json(run_dir / "curve.json", {"name": name, "curve": curve})
                        publish({"name": name, "curve": curve})
                    record = train(args, run_dir, text, device, recipe, on_checkpoint=score_so_far)
                    set_scoring_threads(training=False)
                scored = quality_report.score_run(run_dir, record, data["test_dir"], torch_device, args.curve_samples,
                                                  args.final_samples, args.jobs, MODES)
                runs.append({"name": name, "recipe": recipe, "reverse": reverse, "seed": seed, **scored})
                print(quality_report.curve_table(runs[-1]), flush=True)
                publish({})
    if not runs:
        sys.exit("error: no finished run to score in " + str(out / "runs"))
    table = quality_report.final_table(runs)
    print(table)
    png = quality_report.plot_curves(runs, out / "quality_curve.png", title=f"{args.size}, {info['cpu']}"
                                     if device == "cpu" else f"{args.size}, {info.get('gpu', device)}")
    print(f"curve: {png}")
    publish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
