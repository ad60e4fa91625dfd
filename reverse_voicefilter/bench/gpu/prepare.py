"""Prepare the GPU run on a machine with network: bench-out/gpu-payload/, an ignored folder to copy,
beside the repository, to a GPU machine that has no network.

It holds
* ``wheels/``: the wheels of gpu/wheels.txt for Python 3.12 on manylinux x86-64 (what the
  benchmarks import that the GPU image lacks), downloaded with ``pip download`` (or copied from
  ``--wheels_from DIR``; none with ``--no_download``);
* ``librispeech-mini/``: what bench.quality and bench.inference read, copied byte for byte
  from ``--data``: test-other whole (the test speakers) and of train-clean-100 the first speakers
  by id whose files fit the bytes left (``--budget_mib``, 64 MiB by default: what a transfer to
  the GPU machine may carry, the repository included; librispeech-mini's 72 MB do not fit);
* ``manifest.json``: the sizes and the speakers chosen.

The total that will travel (the repository's tracked and untracked-not-ignored files, plus the
payload) is printed; a payload that cannot fit under ``--budget_mib`` is refused (one line, exit 2)
and the previous payload is kept. Then, on the GPU machine: ``python3 -m reverse_voicefilter.bench.gpu.run``.

    .venv/bin/python -m reverse_voicefilter.bench.gpu.prepare
    .venv/bin/python -m reverse_voicefilter.bench.gpu.prepare --wheels_from .whl --max_speakers 50
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from reverse_voicefilter.core.atomic import write_bytes
from reverse_voicefilter.core.cli import UserErrorParser
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.jsonfile import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
WHEEL_LIST = HERE / "wheels.txt"
DEFAULT_PAYLOAD = ROOT / "bench-out" / "gpu-payload"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "librispeech-mini"
TRAIN, TEST = "train-clean-100", "test-other"
MIB = 1 << 20
# wheels that install on the GPU image's Python 3.12 (x86-64 Linux, glibc 2.28 or newer)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
PYTHON_VERSION = "3.12"
# bench.quality mixes an epoch of 4000 distinct triplets from the pieces of the training speakers:
# the first 70 speakers of librispeech-mini leave about 40 of them without a candidate (the trainer
# stops), the first 90 none
MIN_SPEAKERS = 90


def parse_args(argv=None):
    p = UserErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="librispeech-mini root (default: %(default)s)")
    p.add_argument("--payload", default=str(DEFAULT_PAYLOAD), help="the folder to make (default: %(default)s)")
    wheels = p.add_mutually_exclusive_group()
    wheels.add_argument("--wheels_from", default=None, metavar="DIR",
                        help="copy the wheels from this folder instead of downloading them")
    wheels.add_argument("--no_download", action="store_true",
                        help="no wheels (the GPU machine must already have the packages: run.py --no_install)")
    p.add_argument("--budget_mib", type=float, default=64.0, help="what may travel in all (MiB)")
    p.add_argument("--margin_mib", type=float, default=2.0,
                   help="left free under the budget: for files the repository gains before the run, and folder entries "
                        "if the transfer counts them (MiB; default: %(default)s)")
    p.add_argument("--max_speakers", type=int, default=None, help="at most this many training speakers")
    p.add_argument("--min_speakers", type=int, default=MIN_SPEAKERS,
                   help="refuse a payload with fewer training speakers (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("max_speakers", "min_speakers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


# ---- sizes ---------------------------------------------------------------------------------------
def mib(n):
    return f"{n / MIB:.1f} MiB"


def tree_files(folder):
    """The regular files under ``folder``, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(folder):
    return sum(p.stat().st_size for p in tree_files(folder))


def repo_bytes(root=ROOT):
    """Bytes of the repository's copy that travels beside the payload: the tracked files and the
    untracked ones git does not ignore."""
    try:
        listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise UserError(f"cannot list the repository's files with git in {root}: {err}") from None
    total = 0
    for name in {n for n in listing.decode().split("\0") if n}:
        path = Path(root, name)
        if path.is_symlink() or path.is_file():
            total += path.lstat().st_size
    return total


# ---- wheels --------------------------------------------------------------------------------------
def read_pins(path=WHEEL_LIST):
    """[(name, version)] of the wheel list (``NAME==VERSION`` lines, ``#`` comments)."""
    pins = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins.append((name.strip(), version.strip()))
    return pins


def _normal(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def match_wheels(folder, pins):
    """{pin name: its one wheel file in ``folder``}; a missing or doubled wheel is a UserError."""
    wheels = sorted(Path(folder).glob("*.whl"))
    found = {}
    for name, version in pins:
        hits = [w for w in wheels if [_normal(x) for x in w.name.split("-")[:2]] == [_normal(name), _normal(version)]]
        if len(hits) != 1:
            raise UserError(f"{folder} must hold one wheel of {name}=={version}, found {len(hits)}")
        found[name] = hits[0]
    return found


def download_wheels(pins, dest):
    """``pip download`` the pinned wheels for the GPU machine's Python into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp",
           *[x for platform in PLATFORMS for x in ("--platform", platform)], "-d", str(dest),
           *[f"{name}=={version}" for name, version in pins]]
    print(f"downloading {len(pins)} wheels for Python {PYTHON_VERSION} (manylinux x86-64)", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"pip download failed (exit {done.returncode}): {last}")


# ---- data ----------------------------------------------------------------------------------------
def speaker_sizes(subset):
    """[(speaker, bytes)] of a LibriSpeech subset folder, by speaker id (numeric ids in number order)."""
    speakers = [p for p in Path(subset).iterdir() if p.is_dir()]
    speakers.sort(key=lambda p: (int(p.name), p.name) if p.name.isdigit() else (float("inf"), p.name))
    return [(p.name, tree_bytes(p)) for p in speakers]


def choose_speakers(sizes, room, max_speakers=None):
    """The longest prefix of ``sizes`` (by id) whose bytes fit ``room`` (and ``max_speakers``)."""
    chosen, used = [], 0
    for speaker, size in sizes:
        if used + size > room or (max_speakers and len(chosen) >= max_speakers):
            break
        chosen.append(speaker)
        used += size
    return chosen, used


def _copy_tree(src, dst):
    for path in tree_files(src):
        write_bytes(Path(dst, path.relative_to(src)), path.read_bytes())


def _replace_folder(new, target):
    """Put folder ``new`` at ``target``, the old one (if any) removed only once ``new`` is in place."""
    target = Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def plan(args, wheel_bytes):
    """What goes in the payload and its size accounting (a dict); a UserError when it cannot fit."""
    data = Path(args.data)
    if not (data / TRAIN).is_dir() or not (data / TEST).is_dir():
        raise UserError(f"--data {data} must hold {TRAIN} and {TEST} (librispeech-mini)")
    budget = int(args.budget_mib * MIB)
    extras = sorted(p.name for p in data.iterdir() if p.is_file())  # LICENSE.TXT, README.md, SPEAKERS.TXT
    fixed = {"repository": repo_bytes(), "wheels": sum(wheel_bytes.values()), "test": tree_bytes(data / TEST),
             "extras": sum((data / n).stat().st_size for n in extras)}
    margin = int(args.margin_mib * MIB)
    room = budget - margin - sum(fixed.values())
    sizes = speaker_sizes(data / TRAIN)
    chosen, train_bytes = choose_speakers(sizes, room, args.max_speakers)
    if room < 0 or len(chosen) < min(args.min_speakers, args.max_speakers or args.min_speakers, len(sizes)):
        parts = ", ".join(f"{k} {mib(v)}" for k, v in {**fixed, "margin": margin}.items())
        raise UserError(f"the payload does not fit the {args.budget_mib:g} MiB of --budget_mib: {parts} "
                        f"leave {mib(max(room, 0))} for {TRAIN}, where {len(chosen)} speakers fit, fewer than the "
                        f"{args.min_speakers} bench.quality needs (--min_speakers)")
    return {"budget_bytes": budget, "margin_bytes": margin, **{f"{k}_bytes": v for k, v in fixed.items()},
            "train_bytes": train_bytes, "total_bytes": sum(fixed.values()) + train_bytes, "train_speakers": chosen,
            "train_speakers_total": len(sizes), "extra_files": extras, "wheels": dict(wheel_bytes)}


def build(args, wheel_dir, pins, manifest, work):
    """Fill folder ``work`` (the new payload)."""
    data = Path(args.data)
    for path in (match_wheels(wheel_dir, pins) if pins else {}).values():
        write_bytes(work / "wheels" / path.name, path.read_bytes())
    mini = work / "librispeech-mini"
    for name in manifest["extra_files"]:
        write_bytes(mini / name, (data / name).read_bytes())
    _copy_tree(data / TEST, mini / TEST)
    for speaker in manifest["train_speakers"]:
        _copy_tree(data / TRAIN / speaker, mini / TRAIN / speaker)
    write_json(work / "manifest.json", manifest)


def report(manifest):
    lines = [f"  repository (tracked + untracked, not ignored): {mib(manifest['repository_bytes'])}",
             f"  wheels ({len(manifest['wheels'])}): {mib(manifest['wheels_bytes'])}",
             f"  librispeech-mini {TEST}: {mib(manifest['test_bytes'])}",
             f"  librispeech-mini {', '.join(manifest['extra_files'])}: {mib(manifest['extras_bytes'])}",
             f"  librispeech-mini {TRAIN}: {len(manifest['train_speakers'])} of {manifest['train_speakers_total']} "
             f"speakers, {mib(manifest['train_bytes'])}",
             f"  total that travels: {mib(manifest['total_bytes'])} of {mib(manifest['budget_bytes'])} "
             f"(margin kept free: {mib(manifest['margin_bytes'])})"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    payload = Path(args.payload)
    pins = [] if args.no_download else read_pins()
    payload.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheels.", suffix=".tmp", dir=payload.parent) as downloads:
        wheel_dir = Path(args.wheels_from or downloads)
        if args.wheels_from and not wheel_dir.is_dir():
            raise UserError(f"--wheels_from {wheel_dir} is not a folder")
        if pins and not args.wheels_from:
            download_wheels(pins, wheel_dir)
        wheels = match_wheels(wheel_dir, pins) if pins else {}
        manifest = plan(args, {path.name: path.stat().st_size for path in wheels.values()})
        work = Path(tempfile.mkdtemp(prefix=f".{payload.name}.", suffix=".tmp", dir=payload.parent))
        try:
            build(args, wheel_dir, pins, manifest, work)
            _replace_folder(work, payload)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{payload}:\n{report(manifest)}")
    for name, size in manifest["wheels"].items():
        print(f"    {name} ({mib(size)})")
    print(f"then, on the GPU machine, with {_carry_name(payload)} copied beside the repository: "
          f"PYTHONUNBUFFERED=1 python3 -m reverse_voicefilter.bench.gpu.run")
    return 0


def _carry_name(payload):
    try:
        return str(Path(payload).resolve().relative_to(ROOT))
    except ValueError:
        return str(payload)


if __name__ == "__main__":
    run_cli(main)
