"""Run the benchmarks one after the other (``make bench``): generator, training data loader, training, inference.

Each runs as its own subprocess with the flags given here passed on; each prints its markdown
table as it finishes, and ``--json_dir`` keeps one JSON file per benchmark.

    .venv/bin/python -m reverse_voicefilter.bench.run_all --quick                    # tiny config: minutes
    .venv/bin/python -m reverse_voicefilter.bench.run_all --json_dir bench-out/all   # default sizes: an hour
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ["generator", "loader", "train", "inference"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny config and sizes: checks everything works")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per variant (default: all cores)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant (default: each script's)")
    p.add_argument("--json_dir", default=None, help="write NAME.json per benchmark into this folder")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS, help="run only these")
    args = p.parse_args()
    failed = []
    for name in args.only:
        cmd = [sys.executable, "-m", f"reverse_voicefilter.bench.{name}", "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--timeout", str(args.timeout)] if args.timeout else []
        cmd += ["--json", str(Path(args.json_dir) / f"{name}.json")] if args.json_dir else []
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd).returncode  # its table goes straight to our stdout
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
