"""The whole pipeline on built-in synthetic speech: `make demo`.

corpus -> generator.py -> trainer.py -> inference.py (three mask modes) -> evaluate.py,
each run as the real command a user types, into ``demo/`` (or ``--out``).
Nothing is downloaded. Rerunning reuses what is already there.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "config" / "tiny.yaml"


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--train_size", type=int, default=600)
    parser.add_argument("--test_size", type=int, default=40)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    corpus, data = out / "librispeech", out / "data"
    name = "demo"
    chkpt = out / "chkpt" / name / f"chkpt_{args.steps}.pt"
    started = time.perf_counter()

    run("synthetic corpus", ["-m", "utils.demo_corpus", "-o", corpus])
    run("generate mixtures", ["generator.py", "-c", CONFIG, "-d", corpus, "-o", data, "-p", "2",
                              "--train_size", args.train_size, "--test_size", args.test_size,
                              "--train_subsets", "train-clean-100", "--reverse_data", "False"])
    if not chkpt.exists():
        run("train", ["trainer.py", "-c", CONFIG, "-e", "resemblyzer", "-m", name, "-b", out,
                      "--train_dir", data / "train", "--test_dir", data / "test",
                      "--max_steps", args.steps, "--device", "cpu"])
    sample = "000000"
    mixed, target = data / "test" / f"{sample}-mixed.wav", data / "test" / f"{sample}-target.wav"
    reference = (data / "test" / f"{sample}-dvec.txt").read_text().strip()
    for mode in ("org", "inv_sub", "inv_div"):
        run(f"inference --mask {mode}", ["inference.py", "-c", CONFIG, "-e", "resemblyzer",
                                         "--checkpoint_path", chkpt, "-m", mixed, "-r", reference,
                                         "-o", out / "inference" / mode, "--mask", mode, "--plot"])
    run("evaluate", ["evaluate.py", "-c", CONFIG, "-e", "resemblyzer", "--checkpoint_path", chkpt,
                     "-d", data / "test", "-o", out / "evaluation", "--mask", "all"])

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Look at:")
    print(f"  mixture and clean target  {mixed}\n                            {target}")
    print(f"  separated audio, pictures {out / 'inference'}/<mode>/result.wav, result.png")
    print(f"  evaluation report         {out / 'evaluation'}/report.json, per_sample.csv, sdr_histogram.png")
    print(f"  checkpoints               {out / 'chkpt' / name}")
    print(f"  TensorBoard               tensorboard --logdir {out / 'logs' / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
