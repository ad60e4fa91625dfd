"""D-vectors computed once per split (or, with online mixing, per reference utterance) and embedder,
not at every training step.

The embedder is frozen, so the d-vector of a reference never changes; the
original still pushed every reference of every batch through its 3-layer
768-unit LSTM at every step. Here the d-vectors of all unique references of a
split are computed once, in batches, and kept next to the data in
``<split>/dvec-cache-<embedder.name>.pt``::

    {'embedder': embedder.name, 'dvecs': {reference path (as in -dvec.txt): tensor [E]}}

The file name carries the embedder's identity (a digest of its weights), so
another embedder gets its own cache; later runs read it back
(``torch.load(weights_only=True)``) and only compute references it lacks.

Online mixing (:mod:`reverse_voicefilter.data.online`) has no split folder: its d-vectors,
computed one reference at a time as they are first drawn, are written in
shards ``dvec-online-<embedder.name>-r<rank>-<n>.pt`` (same format) of the new
ones only, so a long run never rewrites what it already saved.
"""
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from reverse_voicefilter.core.atomic import save_torch
from reverse_voicefilter.core.audio import load_wav

logger = logging.getLogger(__name__)

CACHE_PREFIX = "dvec-cache-"
EMBED_BATCH = 16          # references per embed_many call
SAVE_EVERY = 8192         # write partial progress this often (references) on big splits


def cache_path(split_dir, embedder_name):
    """``<split>/dvec-cache-<embedder.name>.pt``."""
    return Path(split_dir) / f"{CACHE_PREFIX}{embedder_name}.pt"


def reference_key(sample):
    """The cache key of a sample: the reference path exactly as its -dvec.txt names it."""
    return str(sample.reference_path())


def resolve_reference(key, split_dir):
    """The file a -dvec.txt line points to: as written (absolute, or relative to the
    working directory as in the original), else relative to the split folder."""
    path = Path(key)
    if not path.is_absolute() and not path.exists() and (Path(split_dir) / path).exists():
        return Path(split_dir) / path
    return path


def read_cache(path, embedder_name):
    """``{key: tensor [E]}`` from a cache file; {} when absent, unreadable or another embedder's."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file is only a cache miss: recompute
        logger.warning("ignoring unreadable d-vector cache %s (%s)", path, str(err).splitlines()[0])
        return {}
    if not isinstance(state, dict) or state.get("embedder") != embedder_name or not isinstance(
            state.get("dvecs"), dict):
        logger.warning("ignoring d-vector cache %s: written for another embedder", path)
        return {}
    return dict(state["dvecs"])


def write_cache(path, embedder_name, dvecs):
    """Write the cache atomically; a read-only data folder only costs a recomputation next run."""
    try:
        save_torch({"embedder": embedder_name, "dvecs": dvecs}, path)
    except OSError as err:
        logger.warning("cannot write the d-vector cache %s (%s): it will be recomputed next run", path, err)


def load_dvecs(samples, split_dir, embedder, sample_rate, write=True, progress=True,
               batch_size=EMBED_BATCH):
    """D-vectors of the samples' references: ``{reference key: float32 tensor [E] on CPU}``.

    Reads ``<split>/dvec-cache-<embedder.name>.pt``, computes the missing
    references with ``embedder.embed_many`` in batches (references loaded with
    :func:`reverse_voicefilter.core.audio.load_wav`), and writes the completed cache back when
    ``write`` (rank 0 under DDP). A missing or unusable reference file is a
    :class:`UserError` naming it.
    """
    path = cache_path(split_dir, embedder.name)
    keys = sorted({reference_key(s) for s in samples})
    cache = read_cache(path, embedder.name)
    missing = [k for k in keys if k not in cache]
    if not missing:
        logger.info("d-vectors of %d references read from %s", len(keys), path)
        return {k: cache[k] for k in keys}
    logger.info("computing d-vectors of %d references (%d cached) with %s", len(missing),
                len(keys) - len(missing), embedder.name)
    unsaved = 0
    with tqdm(total=len(missing), desc=f"d-vectors {Path(split_dir).name}", unit="ref",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            wavs = [load_wav(resolve_reference(k, split_dir), sample_rate) for k in chunk]
            dvecs = embedder.embed_many(wavs).float().cpu()  # [B, E]
            for key, dvec in zip(chunk, dvecs, strict=True):
                cache[key] = dvec.clone()
            bar.update(len(chunk))
            unsaved += len(chunk)
            if write and unsaved >= SAVE_EVERY:
                write_cache(path, embedder.name, cache)
                unsaved = 0
    if write:
        write_cache(path, embedder.name, cache)
    return {k: cache[k] for k in keys}


# ---- online mixing: d-vectors per reference utterance, written as they are computed ------------
ONLINE_PREFIX = "dvec-online-"


def online_shard_paths(folder, embedder_name):
    """The shard files of ``embedder_name`` in ``folder`` (every rank's), sorted."""
    return sorted(Path(folder).glob(f"{ONLINE_PREFIX}{embedder_name}-r*.pt"))


def read_online_shards(folder, embedder_name):
    """``{utterance path: tensor [E]}`` from every shard of ``embedder_name`` in ``folder``; an unreadable
    shard is skipped (its d-vectors are computed again)."""
    dvecs = {}
    for path in online_shard_paths(folder, embedder_name):
        dvecs.update(read_cache(path, embedder_name))
    return dvecs


def write_online_shard(folder, embedder_name, rank, dvecs):
    """Write ``dvecs`` as the next shard of ``rank``: ``dvec-online-<embedder>-r<rank>-<n>.pt``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.warning("cannot create the d-vector cache folder %s (%s): d-vectors will be recomputed", folder,
                       err)
        return
    taken = {p.name for p in folder.glob(f"{ONLINE_PREFIX}{embedder_name}-r{rank}-*.pt")}
    n = len(taken)
    while f"{ONLINE_PREFIX}{embedder_name}-r{rank}-{n:05d}.pt" in taken:
        n += 1
    write_cache(folder / f"{ONLINE_PREFIX}{embedder_name}-r{rank}-{n:05d}.pt", embedder_name, dvecs)
