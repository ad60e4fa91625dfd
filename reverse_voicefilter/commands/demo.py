"""The whole pipeline on built-in synthetic speech: `make demo`.

corpus -> generator.py -> trainer.py -> inference.py (three mask modes) -> evaluate.py,
each run as the real command a user types, into ``demo/`` (or ``--out``).
Nothing is downloaded. Rerunning reuses what is already there.

VoiceFilter stays on a constant-mask plateau for its first ~3500 steps, half an hour of
two CPU cores, so by default the trainer resumes from ``reverse_voicefilter/assets/demo-tiny-6000.pt``: the
checkpoint of ``python demo.py --from_scratch --steps 6000 --export FILE`` (this same
corpus, mixtures and config), shipped with the repository. ``--from_scratch`` trains
from random weights instead.
"""
import contextlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

from reverse_voicefilter.core.cli import UserErrorParser, add_bool_flag
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.separation.options import output_folder

PACKAGE = Path(__file__).resolve().parent.parent
CONFIG = PACKAGE / "config" / "tiny.yaml"
PRETRAINED = PACKAGE / "assets" / "demo-tiny-6000.pt"
# the repository's root, where the original's scripts are; an installed package runs its modules instead
ROOT = PACKAGE.parent
PRETRAINED_STEPS = 6000


def script(name):
    """How a pipeline command is run: the original's ``NAME.py`` at the repository's root, or the
    package's module where the package is installed without the repository."""
    if (ROOT / f"{name}.py").is_file():
        return [f"{name}.py"]
    return ["-m", f"reverse_voicefilter.commands.{name}"]


def run(step, args):
    """Run one pipeline command, echoing it; stop the demo if it fails."""
    cmd = [sys.executable, *map(str, args)]
    print(f"\n== {step}\n$ {shlex.join(['python', *map(str, args)])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        print(f"demo: step '{step}' failed (exit {result.returncode})", file=sys.stderr)
        sys.exit(result.returncode)
    print(f"-- {step}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None):
    parser = UserErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes")
    parser.add_argument("--steps", type=int, default=200,
                        help=f"training steps of this run, after the shipped checkpoint's {PRETRAINED_STEPS} "
                             f"unless --from_scratch (default 200)")
    add_bool_flag(parser, "--from_scratch", help="train from random weights, not from the shipped checkpoint")
    parser.add_argument("--export", default=None, metavar="FILE",
                        help="also write the final checkpoint, in 16 bits, to FILE (how the shipped one was made)")
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--test_size", type=int, default=40)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.train_size < 1 or args.test_size < 1:
        parser.error("--steps, --train_size and --test_size must be positive")
    if not args.from_scratch and not PRETRAINED.is_file():
        print(f"error: the shipped checkpoint {PRETRAINED} is missing (restore it with git, or pass "
              f"--from_scratch)", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    export = Path(args.export).resolve() if args.export else None
    if export is not None and export.is_dir():
        raise UserError(f"--export {args.export} is a folder: give the name of the checkpoint file to write")
    for flag, folder in (("--out", out), ("--export", export.parent if export else None)):
        if folder is not None and folder.exists() and not folder.is_dir():  # else mkdir's bare "File exists"
            raise UserError(f"{flag}: {folder} is a file, not a folder")
    # Every output folder is proved writable before the first step: a bad --export found only after
    # the training, as before, cost the whole run. A folder made here and left empty is removed again.
    with contextlib.ExitStack() as outputs:
        outputs.enter_context(output_folder(out, "--out"))
        if export is not None:
            outputs.enter_context(output_folder(export.parent, "--export"))
        return run_pipeline(args, out, export)


def run_pipeline(args, out, export):
    """Every step, into ``out`` (checked writable); the final checkpoint also to ``export`` if given."""
    corpus, data = out / "librispeech", out / "data"
    name = "demo-scratch" if args.from_scratch else "demo"
    last_step = args.steps if args.from_scratch else PRETRAINED_STEPS + args.steps
    chkpt = out / "chkpt" / name / f"chkpt_{last_step}.pt"
    started = time.perf_counter()

    run("synthetic corpus", ["-m", "reverse_voicefilter.prepare.demo_corpus", "-o", corpus])
    run("generate mixtures", [*script("generator"), "-c", CONFIG, "-d", corpus, "-o", data, "-p", "2",
                              "--train_size", args.train_size, "--test_size", args.test_size,
                              "--train_subsets", "train-clean-100", "--reverse_data", "False"])
    if not chkpt.exists():
        # from scratch, a rerun starts over where an interrupted one left checkpoints (else refused)
        resume = ["--overwrite"] if args.from_scratch else ["--checkpoint_path", PRETRAINED]
        run("train", [*script("trainer"), "-c", CONFIG, "-e", "resemblyzer", "-m", name, "-b", out,
                      "--train_dir", data / "train", "--test_dir", data / "test",
                      "--max_steps", last_step, "--device", "cpu", *resume])
    if export is not None:
        from reverse_voicefilter.core.checkpoint import compact_checkpoint  # here: torch loads only when needed
        compact_checkpoint(chkpt, export)
        print(f"\nwrote {export} (the checkpoint at step {last_step}, 16-bit)")
    sample = "000000"
    mixed, target = data / "test" / f"{sample}-mixed.wav", data / "test" / f"{sample}-target.wav"
    reference = (data / "test" / f"{sample}-dvec.txt").read_text().strip()
    for mode in ("org", "inv_sub", "inv_div"):
        run(f"inference --mask {mode}", [*script("inference"), "-c", CONFIG, "-e", "resemblyzer",
                                         "--checkpoint_path", chkpt, "-m", mixed, "-r", reference,
                                         "-o", out / "inference" / mode, "--mask", mode, "--plot"])
    run("evaluate", [*script("evaluate"), "-c", CONFIG, "-e", "resemblyzer", "--checkpoint_path", chkpt,
                     "-d", data / "test", "-o", out / "evaluation", "--mask", "all"])

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Look at:")
    print(f"  mixture and clean target  {mixed}\n                            {target}")
    print(f"  separated audio, pictures {out / 'inference'}/<mode>/result.wav, result.png")
    print(f"  evaluation report         {out / 'evaluation'}/report.json, per_sample.csv, sdr_before_after.png")
    print(f"  checkpoints               {out / 'chkpt' / name}")
    print(f"  TensorBoard               tensorboard --logdir {out / 'logs' / name}")
    return 0


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
