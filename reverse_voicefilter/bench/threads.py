"""Thread settings on a busy machine: the training step and the separation of a 60 s mixture, alone
and beside 1 or 2 busy single-threaded processes, for each way of choosing torch's CPU threads.

Settings (each in a fresh process: the OpenMP wait policy is read when torch loads):

* ``all``      one thread per core, idle threads spinning (torch's default before core/threads.py);
* ``cores-1``  one thread fewer than cores, spinning;
* ``one``      one thread;
* ``passive``  one thread per core, idle threads sleeping (``OMP_WAIT_POLICY=PASSIVE``);
* ``short-spin`` one thread per core, idle threads spinning a short while before they sleep
  (``GOMP_SPINCOUNT``, GNU OpenMP's, which torch's Linux wheels use; 300,000 by default);
* ``auto``     the commands' default now: core.threads (cores less the busy ones, sleeping).

The busy processes are Python loops (one core each, ending with this benchmark), started before
the measured process and stopped after it. Each figure is the median of ``--steps`` calls after
one warm-up. Figures on a machine where other jobs run mean little: stop them first (the ratios
to ``one`` alone are what the README's advice rests on).

    .venv/bin/python -m reverse_voicefilter.bench.threads --sizes tiny --loads 0 1 --steps 3
    .venv/bin/python -m reverse_voicefilter.bench.threads --json bench-out/threads.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from reverse_voicefilter.bench import common, machine

SETTINGS = ("all", "cores-1", "one", "passive", "short-spin", "auto")
SHORT_SPIN = 10000
WORKLOADS = ("train", "separate")
TAG = "THREADS_RESULT "
# one core kept busy until this benchmark ends, even when it is killed before it can stop them
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"


def setting_env(setting, cores):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")}
    threads = {"all": cores, "cores-1": max(1, cores - 1), "one": 1, "passive": cores, "short-spin": cores}.get(setting)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if setting == "short-spin":
        env["GOMP_SPINCOUNT"] = str(SHORT_SPIN)
    return env


# ---- the measured process -------------------------------------------------------------------------
def child(workload, size, steps, setting):
    from reverse_voicefilter.core import threads

    if setting == "auto":  # what the commands do: decide from the load, idle threads sleeping
        threads.configure(None)
    import numpy as np
    import torch

    # the fixed settings leave torch and OpenMP to the environment setting_env() made
    reason = threads.decide().reason if setting == "auto" else f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if setting == "auto":
        threads.apply()
    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter

    hp = HParam(common.PACKAGE / "config" / f"{size}.yaml")
    torch.manual_seed(0)
    if workload == "train":
        from reverse_voicefilter.training.steps import make_loss, train_step

        model = VoiceFilter(hp).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        frames = 1 + int(hp.data.audio_len * hp.audio.sample_rate) // hp.audio.hop_length
        batch = 8 if size == "tiny" else 2
        data = (torch.randn(batch, hp.embedder.emb_dim), torch.rand(batch, frames, hp.audio.num_freq),
                torch.rand(batch, frames, hp.audio.num_freq))
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        def call():
            train_step(model, data, optimizer, scaler, make_loss(hp), torch.device("cpu"), "fp32")
    else:
        from reverse_voicefilter.separation.separator import Separator

        model = VoiceFilter(hp).for_inference()
        separator = Separator(hp, model, None, torch.device("cpu"))
        wav = (0.1 * np.random.default_rng(0).standard_normal(60 * hp.audio.sample_rate)).astype(np.float32)
        dvec = torch.randn(hp.embedder.emb_dim)

        def call():
            separator.separate(wav, dvec, ["org"])
    times = common.time_call(call, torch.device("cpu"), warmup=1, repeats=steps)
    print(TAG + json.dumps({"seconds": statistics.median(times), "threads": torch.get_num_threads(),
                            "reason": reason}), flush=True)


# ---- the parent -----------------------------------------------------------------------------------
def measure(workload, size, setting, load, steps, timeout, cores):
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)  # the busy processes are running before the measured one starts
        cmd = [sys.executable, "-m", __spec__.name, "--child", workload, size, str(steps), setting]
        done = subprocess.run(cmd, env=setting_env(setting, cores), capture_output=True, text=True, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith(TAG)]
        if done.returncode or not lines:
            return {"error": (done.stderr.strip().splitlines() or ["no result"])[-1][:120]}
        return json.loads(lines[-1][len(TAG):])
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def table(results, sizes, loads):
    lines = []
    for workload in WORKLOADS:
        for size in sizes:
            base = results.get(f"{workload}/{size}/one/0", {}).get("seconds")
            lines += [f"\n{workload}, {size} ({'s/step' if workload == 'train' else 's for 60 s of audio'}; "
                      "x: over one thread alone)\n",
                      "| setting | " + " | ".join(f"{n} busy" for n in loads) + " |",
                      "|---|" + "---|" * len(loads)]
            for setting in SETTINGS:
                cells = []
                for load in loads:
                    r = results.get(f"{workload}/{size}/{setting}/{load}")
                    if r is None:
                        cells.append("")
                    elif "error" in r:
                        cells.append(r["error"])
                    else:
                        ratio = f" (x{r['seconds'] / base:.2f})" if base else ""
                        cells.append(f"{r['seconds']:.2f}{ratio}, {r['threads']} thr")
                lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "default"], choices=["tiny", "default"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2], help="busy processes beside the measured one")
    p.add_argument("--steps", type=int, default=3, help="timed calls per measurement (after one warm-up)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        workload, size, steps, setting = args.child
        return child(workload, size, int(steps), setting)
    import torch

    info = machine.describe_machine(torch.device("cpu"))
    cores = info["cores"]
    results = {}
    for workload in args.workloads:
        for size in args.sizes:
            for load in args.loads:
                for setting in args.settings:
                    key = f"{workload}/{size}/{setting}/{load}"
                    results[key] = measure(workload, size, setting, load, args.steps, args.timeout, cores)
                    print(f"  {key}: {results[key]}", file=sys.stderr, flush=True)
                    if args.json:
                        from reverse_voicefilter.core.jsonfile import write_json

                        write_json(args.json, {"machine": info, "results": results})
    print(machine.machine_line(info))
    print(table(results, args.sizes, args.loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
