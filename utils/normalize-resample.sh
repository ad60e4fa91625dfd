#!/usr/bin/env bash
# Loudness-normalize (EBU R128) and resample every .flac below a folder to 16 kHz mono,
# writing <name>-norm.wav next to each <name>.flac, as the original project did.
#
# As in the original, copy it into the LibriSpeech root and run it there, with the project's
# python on PATH (e.g. its activated .venv):
#     cp utils/normalize-resample.sh data/LibriSpeech/ && cd data/LibriSpeech && ./normalize-resample.sh
# or run it in place on a folder:  utils/normalize-resample.sh [-j JOBS] [-v] [DIR]
#
#   -j JOBS   parallel jobs (default: $N if set, else one per core)
#   -v        name each file as it is finished
#
# A thin wrapper: `python -m reverse_voicefilter.prepare.normalize` does the work (skips files done, waits
# for every job, exits 1 naming the files that failed, or when there is no .flac at all).
# The python is $PYTHON, else python3 (or python) on PATH. The package is taken from, in this
# order: the repository $VOICEFILTER_HOME; the repository above this script (run in place); that
# python's own installation (pip install of the repository: any venv or conda environment); the
# repository holding that python's venv (the .venv that the README and the Makefile create in it).
set -uo pipefail

die() { echo "error: $*" >&2; exit 2; }

jobs="${N:-}"
verbose=""
while getopts ":j:vh" opt; do
    case "$opt" in
        j) jobs="$OPTARG" ;;
        v) verbose=1 ;;
        h) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        :) die "-$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG (see -h)" ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -le 1 ]] || die "expected at most one folder, got $#"
root="${1:-.}"
# checked here too, so that a typo is one line rather than argparse's usage and error
[[ -z "$jobs" || "$jobs" =~ ^[1-9][0-9]*$ ]] || die "the number of jobs must be a positive integer, got '$jobs'"

python="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$python" ]] || die "no python on PATH: activate the project's venv (. .venv/bin/activate) or set PYTHON"

holds_module() { [[ -f "$1/reverse_voicefilter/prepare/normalize.py" ]]; }
installed() { "$python" -c 'import reverse_voicefilter.prepare.normalize' >/dev/null 2>&1; }
repo=""
if [[ -n "${VOICEFILTER_HOME:-}" ]]; then
    repo="$VOICEFILTER_HOME"
    holds_module "$repo" || die "VOICEFILTER_HOME=$repo holds no reverse_voicefilter/prepare/normalize.py:" \
                                "set it to the repository"
elif holds_module "$(dirname "$0")/.."; then
    repo="$(dirname "$0")/.."
elif ! installed; then
    repo="$("$python" -c 'import sys; print(sys.prefix)' 2>/dev/null)/.."
    holds_module "$repo" || die "$python has no reverse_voicefilter package: pip install the repository" \
                                "(pip install -e /path/to/it), activate its .venv, or export VOICEFILTER_HOME=/path/to/it"
fi
if [[ -n "$repo" ]]; then
    repo="$(cd "$repo" && pwd)"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! msg=$("$python" -c 'import reverse_voicefilter.prepare.normalize, tqdm' 2>&1); then
    die "$python cannot run reverse_voicefilter.prepare.normalize${repo:+ from $repo} ($(printf '%s' "$msg" | tail -n 1));" \
        "activate the project's venv or set PYTHON to its python"
fi
exec "$python" -m reverse_voicefilter.prepare.normalize ${jobs:+-j "$jobs"} ${verbose:+--verbose} -- "$root"
