"""The GPU run: the benchmarks on a machine with torch (CUDA) but no network, from the payload
reverse_voicefilter/bench/gpu/prepare.py made, in about 9 minutes, every result in one output folder.

Stages, each with its own time limit (a stage that fails or runs out of time is logged and the
next one still runs):

1. ``install``: the payload's wheels, offline, into ``--site`` (``pip install --no-index
   --target``), put on PYTHONPATH of the later stages, then the imports the benchmarks need checked
   (reverse_voicefilter/bench/gpu/install.py);
2. ``train``: bench.train, the CUDA variants (fp32, fp32-cl, bf16, bf16-cl, fp16,
   bf16-cl-cudnn, bf16-cl-compile) at the default size, a few steps each;
3. ``inference``: bench.inference, the variants but model-fp32-bn (a question of CPU inference), on
   the payload's test-other speech;
4. ``quality``: bench.quality --size default --precision bf16 --minutes M, M the minutes that
   remain of ``--total_minutes`` after the time its data preparation and scoring take
   (``--reserve_s``), at least ``--min_minutes``; should they take longer, it is stopped at
   ``--stop_minutes`` (9.75: the device tool stops a command at 10).

The output folder (the argument; default $OUT when set, else bench-out/gpu) gets few files, as
the device tool brings back at most 8: ``run.log`` (every stage's output), ``train.json``,
``inference.json``, ``quality.json``, ``quality_curve.png`` and ``summary.json`` (per stage:
command, exit code, seconds, whether it timed out, its result file).

``--device cpu --quick`` runs the same stages at their ``--quick`` sizes with the fp32 variants:
a check on the CPU machine that the run works (``--no_install`` there: the wheels are for the
GPU machine's Python 3.12).

    python3 -m reverse_voicefilter.bench.gpu.run                                   # on the GPU machine (device tool)
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
# seconds each stage may take on the GPU; the quality stage gets what remains of --total_minutes
# (at most 310 s: then the quality stage has 3 min of training and until --stop_minutes for the rest)
LIMITS = {"install": 30, "train": 150, "inference": 130}
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
    p.add_argument("--total_minutes", type=float, default=9.0,
                   help="the whole run's budget; the quality stage's training ends within it (default: %(default)s)")
    p.add_argument("--stop_minutes", type=float, default=9.75,
                   help="the quality stage is stopped at this minute of the run, scored or not (the device tool "
                        "stops a command at 10; default: %(default)s)")
    p.add_argument("--min_minutes", type=float, default=3.0, help="the quality stage's least training minutes")
    p.add_argument("--eval_every", type=int, default=300, help="the quality stage's steps between checkpoints")
    p.add_argument("--reserve_s", type=float, default=90.0,
                   help="seconds of the quality stage besides training: data, scoring (default: %(default)s)")
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
        train = ["--steps", "10", "--warmup", "3", "--timeout", "60", "--variants", *TRAIN_VARIANTS]
        inference = ["--repeats", "10", "--long_repeats", "3", "--timeout", "60", "--variants", *INFERENCE_VARIANTS]
    limit = QUICK_LIMIT if args.quick else None
    return [Stage("train", [sys.executable, "-m", "reverse_voicefilter.bench.train", *common, *train,
                            "--json", str(out / "train.json")], limit or LIMITS["train"], "train.json"),
            Stage("inference", [sys.executable, "-m", "reverse_voicefilter.bench.inference", *common, *inference,
                                "--data", data, "--json", str(out / "inference.json")],
                  limit or LIMITS["inference"], "inference.json")]


def quality_stage(args, out, seconds_left, stop_left):
    """bench.quality training for the minutes that remain (``seconds_left`` of the budget, less
    the reserve for its data and scoring), stopped ``stop_left`` seconds from now at the latest."""
    cmd = [sys.executable, "-m", "reverse_voicefilter.bench.quality", "--device", args.device,
           "--data", str(Path(args.payload, "librispeech-mini")), "-o", args.work, "--json", str(out / "quality.json"),
           "--jobs", str(args.jobs)]
    if args.quick:
        return Stage("quality", [*cmd, "--quick"], QUICK_LIMIT, "quality.json")
    minutes = max(args.min_minutes, (seconds_left - args.reserve_s) / 60)
    minutes = int(minutes * 10) / 10
    precision = "bf16" if args.device == "cuda" else "fp32"
    cmd += ["--size", "default", "--precision", precision, "--minutes", f"{minutes:g}",
            "--eval_every", str(args.eval_every)]
    return Stage("quality", cmd, max(stop_left, minutes * 60 + GRACE_S), "quality.json")


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
    deadline, stop = start + args.total_minutes * 60, start + args.stop_minutes * 60
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
                    f"{'no time budget' if args.quick else f'budget {args.total_minutes:g} min'}\n")
        planned = [install_stage(args, out), *bench_stages(args, out), None]
        for stage in planned:
            if stage is None:
                stage = quality_stage(args, out, deadline - time.monotonic(), stop - time.monotonic())
            if stage.name not in args.stages:
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
