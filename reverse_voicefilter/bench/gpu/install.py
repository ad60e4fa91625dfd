"""The GPU run's first stage: the payload's wheels installed offline into a folder, then the imports
the benchmarks need checked in a fresh interpreter (which must have that folder on PYTHONPATH, as
run.py gives every stage).

    python3 -m reverse_voicefilter.bench.gpu.install --wheels bench-out/gpu-payload/wheels --site /tmp/site
"""
import argparse
import subprocess
import sys
from pathlib import Path

# what the benchmarks import; the image of the GPU machine has the first ones, the wheels bring the rest
IMPORTS = ["numpy", "scipy", "torch", "matplotlib", "tqdm", "yaml", "psutil",
           "torchmetrics", "librosa", "soundfile", "soxr", "tensorboardX", "mir_eval"]
CHECK = f"""
import importlib, importlib.util, pathlib
for name in {IMPORTS!r}:
    module = importlib.import_module(name)
    print(f"  {{name}} {{getattr(module, '__version__', '?')}} {{module.__file__}}")
spec = importlib.util.find_spec("resemblyzer")
weights = pathlib.Path(spec.origin).parent / "pretrained.pt" if spec else None
if weights is None or not weights.is_file():
    raise SystemExit("error: the resemblyzer weights are missing (its wheel is not installed)")
print(f"  resemblyzer weights {{weights}}")
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", required=True, help="folder of .whl files (absent or empty: nothing to install)")
    p.add_argument("--site", required=True, help="the folder to install into (pip --target)")
    p.add_argument("--no_install", action="store_true", help="only check the imports")
    args = p.parse_args(argv)
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if args.no_install or not wheels:
        print("install: " + ("--no_install" if args.no_install else f"no wheels in {args.wheels}")
              + ": the installed packages are used", flush=True)
    else:
        print(f"install: {len(wheels)} wheels into {args.site}", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", args.site, *map(str, wheels)]
        if subprocess.run(cmd).returncode:
            return "error: pip could not install the wheels (see above)"
    print("imports:", flush=True)
    return subprocess.run([sys.executable, "-c", CHECK]).returncode


if __name__ == "__main__":
    sys.exit(main())
