"""How long each utterance is, from its file's header (no decoding), kept in a cache file.

On-the-fly mixing needs to know, before any compute, whether the data can make a mixture at all
(a reference long enough for a d-vector, a target and an interference at least ``data.audio_len``
long), and, when a sample's planned candidates are all too short, which utterances a further
draw may take. A header gives the length of the whole file, an upper bound of what remains after
the leading and trailing silence is trimmed: a file too short by its header is too short, and
the rest is decided when it is read. Reading 28,000 LibriSpeech headers takes seconds; the
lengths are kept in ``lengths.json`` beside the d-vector cache (keyed by path, size and
modification time) so a restart reads none again.
"""
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from reverse_voicefilter.core.atomic import write_text

logger = logging.getLogger(__name__)

CACHE_NAME = "lengths.json"
READERS = 16  # headers are read in threads: the time is the file system's, not the CPU's


def _header_seconds(path):
    """Seconds by the file's header; 0 for a file that cannot be read (it can be no utterance)."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return 0.0
    return info.frames / info.samplerate if info.samplerate else 0.0


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def header_seconds(paths, cache_dir=None, progress=False):
    """Seconds of each file of ``paths`` by its header, as a float64 array; cached in
    ``cache_dir/lengths.json`` when ``cache_dir`` is given."""
    cache_file = Path(cache_dir) / CACHE_NAME if cache_dir else None
    cached = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}  # a damaged cache is read again from the headers
    stamps = [_stamp(p) for p in paths]
    seconds = np.zeros(len(paths))
    missing = []
    for i, (path, stamp) in enumerate(zip(paths, stamps, strict=True)):
        entry = cached.get(path)
        if entry is not None and stamp is not None and entry[:2] == stamp:
            seconds[i] = entry[2]
        else:
            missing.append(i)
    if missing:
        with ThreadPoolExecutor(READERS) as pool:
            found = pool.map(_header_seconds, (paths[i] for i in missing))
            for i, value in tqdm(zip(missing, found, strict=True), total=len(missing), desc="reading headers",
                                 unit="file", disable=not progress or None):
                seconds[i] = value
        if cache_file is not None:
            for i in missing:
                if stamps[i] is not None:
                    cached[paths[i]] = [*stamps[i], float(seconds[i])]
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text(cache_file, json.dumps(cached))
        logger.info("lengths of %d utterance file(s) read from their headers (%d cached)", len(missing),
                    len(paths) - len(missing))
    return seconds
