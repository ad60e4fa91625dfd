#!/usr/bin/env bash
# Loudness-normalize (EBU R128) and resample every .flac below a folder to 16 kHz mono,
# writing <name>-norm.wav next to each <name>.flac, as the original project did.
#
# Copy it into the LibriSpeech root and run it there:
#     cp utils/normalize-resample.sh /data/LibriSpeech/ && cd /data/LibriSpeech && ./normalize-resample.sh
# or point it at a folder:  ./normalize-resample.sh [-j JOBS] [-v] [DIR]
#
#   -j JOBS   parallel jobs (default: $N if set, else the number of cores)
#   -v        print each file as it is finished
#
# Files whose -norm.wav already exists are skipped, so an interrupted run is resumed by running
# it again.  Each output is written under a temporary name and renamed when complete, so a
# half-written file never counts as done.  The script returns only after every job has
# finished, and exits 1 naming the files that failed.
#
# Needs ffmpeg-normalize (PATH, or importable by $PYTHON / python3) and ffmpeg (PATH, $FFMPEG_PATH,
# or the binary shipped by the imageio-ffmpeg wheel).
set -uo pipefail

SUFFIX="-norm.wav"
PARTIAL="-norm.partial.wav"  # does not match *-norm.wav, so the generator never reads it

die() { echo "error: $*" >&2; exit 2; }

# --- worker mode: one file, run by xargs in a fresh bash (exported settings in the environment)
if [[ "${1:-}" == "--worker" ]]; then
    f="$2"
    out="${f%.*}${SUFFIX}"
    tmp="${f%.*}${PARTIAL}"
    trap 'rm -f "$tmp"' INT TERM
    if [[ -n "${RVF_FFNORM:-}" ]]; then
        cmd=("$RVF_FFNORM")
    else
        cmd=("$RVF_PYTHON" -m ffmpeg_normalize)
    fi
    # -ar 16000 as in the original; -ac 1 because the product reads mono; -f overwrites a stale partial.
    if msg=$("${cmd[@]}" "$f" -ar 16000 -ac 1 -f -o "$tmp" 2>&1) && [[ -s "$tmp" ]] && mv -f "$tmp" "$out"; then
        [[ "${RVF_VERBOSE:-0}" == 1 ]] && echo "done: $out"
        exit 0
    fi
    rm -f "$tmp"
    echo "failed: $f: $(printf '%s' "$msg" | tr '\n' ' ' | sed $'s/\033\\[[0-9;]*m//g' | cut -c1-300)" >&2
    exit 1  # not 255: that would make xargs stop launching the remaining files
fi

# --- main mode
count_cores() {
    nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1
}

jobs="${N:-$(count_cores)}"
verbose=0
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
root="${1:-.}"
[[ $# -le 1 ]] || die "expected at most one folder, got $#"
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "the number of jobs must be a positive integer, got '$jobs'"
[[ -d "$root" ]] || die "no such folder: $root"

# A python that can run ffmpeg-normalize / locate imageio-ffmpeg's ffmpeg.
python_bin="${PYTHON:-$(command -v python3 || command -v python || true)}"

if command -v ffmpeg-normalize >/dev/null 2>&1; then
    RVF_FFNORM="$(command -v ffmpeg-normalize)"
elif [[ -n "$python_bin" ]] && "$python_bin" -c 'import ffmpeg_normalize' >/dev/null 2>&1; then
    RVF_FFNORM=""
else
    die "ffmpeg-normalize not found: pip install ffmpeg-normalize (or set PYTHON to a python that has it)"
fi

if [[ -z "${FFMPEG_PATH:-}" ]] && ! command -v ffmpeg >/dev/null 2>&1; then
    if [[ -n "$python_bin" ]]; then
        FFMPEG_PATH="$("$python_bin" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())' 2>/dev/null)"
    fi
    [[ -n "${FFMPEG_PATH:-}" ]] || die "ffmpeg not found: install ffmpeg or pip install imageio-ffmpeg"
    export FFMPEG_PATH  # ffmpeg-normalize looks here before PATH
fi

todo=()
skipped=0
while IFS= read -r -d '' f; do
    if [[ -e "${f%.*}${SUFFIX}" ]]; then
        skipped=$((skipped + 1))
    else
        todo+=("$f")
    fi
done < <(find "$root" -type f -name '*.flac' -print0 | sort -z)

echo "normalize-resample: ${#todo[@]} to do, $skipped already done, $jobs parallel jobs" >&2
if [[ ${#todo[@]} -eq 0 ]]; then
    exit 0
fi

export RVF_FFNORM RVF_VERBOSE="$verbose" RVF_PYTHON="$python_bin"

# xargs waits for every job it started before it exits, unlike the original's bare '&' loop.
printf '%s\0' "${todo[@]}" | xargs -0 -n 1 -P "$jobs" "$BASH" "$0" --worker

# The outputs on disk are the record of what succeeded, whatever happened to the workers.
failed=()
for f in "${todo[@]}"; do
    [[ -e "${f%.*}${SUFFIX}" ]] || failed+=("$f")
done
echo "normalize-resample: $(( ${#todo[@]} - ${#failed[@]} )) normalized, $skipped skipped," \
     "${#failed[@]} failed" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "error: ${#failed[@]} file(s) failed: ${failed[*]}" >&2
    exit 1
fi
exit 0
