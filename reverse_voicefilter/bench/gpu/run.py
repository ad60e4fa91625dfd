"""The GPU run: the benchmarks on a machine with torch (CUDA) but no network, from the payload
reverse_voicefilter/bench/gpu/prepare.py made, in about 9 minutes, every result in one output folder.

Stages, each with its own time limit (a stage that fails or runs out of time is logged and the
next one still runs); every stage writes its results as they come, so one stopped at its limit
still returns what it finished:

1. ``install``: the payload's wheels, offline, into ``--site`` (``pip install --no-index
   --target``), put on PYTHONPATH of the later stages, then the imports the benchmarks need checked
   (gpu/install.py);
2. ``quality``, first and with most of the budget (``--quality_minutes``, 6 of about 9.5): bench.quality
   --size default --precision bf16 at batch ``--batch_size`` (32) with loader workers, training for
   the stage's minutes less ``--reserve_s`` (its data and final scoring), its curve scored while it
   trains;
3. ``train``: bench.train, the CUDA variants (fp32, fp32-cl, bf16, bf16-cl, fp16, bf16-cl-cudnn,
   and last, as it is slow to start, bf16-cl-compile) at the default size, a few steps each;
4. ``inference``: bench.inference, the variants but model-fp32-bn (a question of CPU inference), on
   the payload's test-other speech.

No stage runs past ``--stop_minutes`` (9.75: a command of at most 10 minutes).

The output folder (the argument; default $OUT when set, else bench-out/gpu) gets few files, as a
transfer back from a remote GPU machine may be limited (8 files): ``run.log`` (every stage's output), ``train.json``,
``inference.json``, ``quality.json``, ``quality_curve.png`` and ``summary.json`` (per stage:
command, exit code, seconds, whether it timed out, its result file).

``--device cpu --quick`` runs the same stages at their ``--quick`` sizes with the fp32 variants:
a check on the CPU machine that the run works (``--no_install`` there: the wheels are for the
GPU machine's Python 3.12).

    python3 -m reverse_voicefilter.bench.gpu.run                                   # on the GPU machine
    .venv/bin/python -m reverse_voicefilter.bench.gpu.run /tmp/gpu-check --device cpu --quick --no_install
"""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# stdlib only, these three: they run before the install
from reverse_voicefilter.core.atomic import write_bytes
from reverse_voicefilter.core.cli import UserErrorParser, check_writable_dir
from reverse_voicefilter.core.errors import run_cli
from reverse_voicefilter.core.jsonfile import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
BENCH_OUT = ROOT / "bench-out"
DEFAULT_PAYLOAD = BENCH_OUT / "gpu-payload"
TRAIN_VARIANTS = ["fp32", "fp32-cl", "bf16", "bf16-cl", "fp16", "bf16-cl-cudnn", "bf16-cl-compile"]
INFERENCE_VARIANTS = ["model-fp32", "model-fp32-cl", "model-bf16", "model-bf16-cl", "process-fp32", "process-bf16-cl"]
QUICK_TRAIN_VARIANTS = ["fp32"]
QUICK_INFERENCE_VARIANTS = ["model-fp32", "process-fp32"]
# seconds each stage may take on the GPU besides the quality stage's --quality_minutes
LIMITS = {"install": 30, "train": 100, "inference": 75}
QUICK_LIMIT = 900  # per stage with --quick (a shared CPU: no budget to keep to)
RESULTS = ["run.log", "train.json", "inference.json", "quality.json", "quality_curve.png", "summary.json"]
GRACE_S = 15  # after SIGTERM, before SIGKILL


def parse_args(argv=None):
    p = UserErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(BENCH_OUT / "gpu")
    p.add_argument("out", nargs="?", default=default_out, help="result folder (default: $OUT, else bench-out/gpu)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the benchmarks compute")
    p.add_argument("--quick", action="store_true", help="every stage at its --quick size (a check that it works)")
    p.add_argument("--payload", default=str(DEFAULT_PAYLOAD), help="what prepare.py made (default: %(default)s)")
    p.add_argument("--no_install", action="store_true", help="use the installed packages, not the payload's wheels")
    p.add_argument("--site", default="/tmp/site", help="where the wheels are installed (default: %(default)s)")
    p.add_argument("--work", default=str(BENCH_OUT / "gpu-quality"),
                   help="bench.quality's work folder (its data and trained models; default: %(default)s)")
    p.add_argument("--stop_minutes", type=float, default=9.75,
                   help="no stage runs past this minute of the run (default: %(default)s)")
    p.add_argument("--quality_minutes", type=float, default=6.0,
                   help="the quality stage's whole time: data, training, scoring (default: %(default)s)")
    p.add_argument("--reserve_s", type=float, default=75.0,
                   help="seconds of the quality stage besides training: data, final scoring (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=32, help="the quality stage's training batch (default: 32)")
    p.add_argument("--eval_every", type=int, default=500, help="the quality stage's steps between checkpoints")
    p.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                   help="processes for the quality stage's data and SDR (default: %(default)s)")
    p.add_argument("--stages", nargs="+", default=["install", "train", "inference", "quality"],
                   choices=["install", "train", "inference", "quality"], help="run only these stages")
    return p.parse_args(argv)


@dataclass
class Stage:
    name: str
    cmd: list
    limit_s: float
    result: str | None = None  # the file in the output folder this stage writes
    env: dict = field(default_factory=dict)


def install_stage(args, out):
    """The offline install of the payload's wheels and the import check (gpu/install.py)."""
    cmd = [sys.executable, str(HERE / "install.py"), "--wheels", str(Path(args.payload, "wheels")), "--site", args.site]
    return Stage("install", [*cmd, "--no_install"] if args.no_install else cmd, LIMITS["install"])


def bench_stages(args, out):
    """The train and inference stages."""
    data = str(Path(args.payload, "librispeech-mini"))
    common = ["--device", args.device]
    if args.quick:
        train = ["--quick", "--variants", *QUICK_TRAIN_VARIANTS]
        inference = ["--quick", "--variants", *QUICK_INFERENCE_VARIANTS]
    else:
        train = ["--steps", "5", "--warmup", "2", "--timeout", "40", "--variants", *TRAIN_VARIANTS]
        inference = ["--repeats", "5", "--long_repeats", "2", "--timeout", "30", "--variants", *INFERENCE_VARIANTS]
    limit = QUICK_LIMIT if args.quick else None
    return [Stage("train", [sys.executable, "-m", "reverse_voicefilter.bench.train", *common, *train,
                            "--json", str(out / "train.json")], limit or LIMITS["train"], "train.json"),
            Stage("inference", [sys.executable, "-m", "reverse_voicefilter.bench.inference", *common, *inference,
                                "--data", data, "--json", str(out / "inference.json")],
                  limit or LIMITS["inference"], "inference.json")]


def quality_stage(args, out):
    """bench.quality at the default size: training for ``--quality_minutes`` less ``--reserve_s``, the
    data mixed by loader workers (``--jobs``), at batch ``--batch_size``."""
    cmd = [sys.executable, "-m", "reverse_voicefilter.bench.quality", "--device", args.device,
           "--data", str(Path(args.payload, "librispeech-mini")), "-o", args.work, "--json", str(out / "quality.json"),
           "--jobs", str(args.jobs)]
    if args.quick:
        return Stage("quality", [*cmd, "--quick"], QUICK_LIMIT, "quality.json")
    minutes = int((args.quality_minutes * 60 - args.reserve_s) / 6) / 10
    precision = "bf16" if args.device == "cuda" else "fp32"
    cmd += ["--size", "default", "--precision", precision, "--minutes", f"{minutes:g}",
            "--eval_every", str(args.eval_every), "--batch_size", str(args.batch_size), "--workers", str(args.jobs),
            "--final_samples", "0"]
    return Stage("quality", cmd, args.quality_minutes * 60, "quality.json")


def run_stage(stage, log, env):
    """Run one stage, its output into ``log`` (and on stdout); stopped at its limit (SIGTERM to its
    process group, SIGKILL after GRACE_S). Returns (exit code or None, seconds, timed out)."""
    header = f"\n===== {stage.name}: limit {stage.limit_s:.0f} s: {' '.join(stage.cmd)}\n"
    _write(log, header)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**env, **stage.env}, start_new_session=True)
    except OSError as err:
        _write(log, f"===== {stage.name}: could not start: {err}\n")
        return None, 0.0, False
    reader = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=stage.limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    except BaseException:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(timeout=5)
    seconds = time.monotonic() - start
    _write(log, f"===== {stage.name}: {'timed out, ' if timed_out else ''}exit {proc.returncode} after "
                f"{seconds:.1f} s\n")
    return proc.returncode, seconds, timed_out


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_LOG_LOCK = threading.Lock()


def _write(log, text):
    with _LOG_LOCK:
        log.write(text)
        log.flush()
        sys.stdout.write(text)
        sys.stdout.flush()


def _pump(stream, log):
    for raw in iter(stream.readline, b""):
        _write(log, raw.decode(errors="replace"))


def _trainer_tails(work, log, lines=20):
    """The end of each quality training log (kept in the work folder, which does not come back)."""
    for path in sorted(Path(work, "runs").glob("*/train.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        _write(log, f"----- {path.relative_to(work)} (last {len(tail)} lines)\n" + "\n".join(tail) + "\n")


def main(argv=None):
    args = parse_args(argv)
    out = check_writable_dir(args.out, "output")
    start = time.monotonic()
    stop = start + args.stop_minutes * 60
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not args.no_install and any(Path(args.payload, "wheels").glob("*.whl")):
        env["PYTHONPATH"] = os.pathsep.join(x for x in [args.site, env.get("PYTHONPATH")] if x)
    summary = {"args": vars(args), "stages": []}
    for name in RESULTS:  # an earlier run's results would pass for this one's
        (out / name).unlink(missing_ok=True)
    # the log streams as the stages run, so a run stopped from outside still returns what it did
    with open(out / "run.log", "w") as log:
        _write(log, f"===== GPU run: device {args.device}{' (quick)' if args.quick else ''}, output {out}, "
                    f"payload {args.payload}, "
                    f"{'no time budget' if args.quick else f'stop at {args.stop_minutes:g} min'}\n")
        planned = [install_stage(args, out), quality_stage(args, out), *bench_stages(args, out)]
        for stage in planned:
            if stage.name not in args.stages:
                continue
            if not args.quick:  # no stage runs past --stop_minutes
                stage.limit_s = min(stage.limit_s, stop - time.monotonic())
                if stage.limit_s < 10:
                    _write(log, f"===== {stage.name}: skipped, the run's time is up\n")
                    continue
            started = time.time()
            code, seconds, timed_out = run_stage(stage, log, env)
            if stage.name == "quality":
                _trainer_tails(args.work, log)
                curve = Path(args.work, "quality_curve.png")
                if curve.is_file() and curve.stat().st_mtime >= started:  # this run's, not an earlier one's
                    write_bytes(out / curve.name, curve.read_bytes())
            summary["stages"].append({"name": stage.name, "command": stage.cmd, "limit_s": stage.limit_s,
                                      "exit": code, "seconds": round(seconds, 1), "timed_out": timed_out,
                                      "result": stage.result,
                                      "result_written": bool(stage.result and (out / stage.result).is_file())})
            write_json(out / "summary.json", summary)
        failed = [s["name"] for s in summary["stages"] if s["exit"] != 0]
        _write(log, f"===== done: {len(summary['stages']) - len(failed)} of {len(summary['stages'])} stages "
                    f"succeeded{'; failed: ' + ', '.join(failed) if failed else ''}; results in {out}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
