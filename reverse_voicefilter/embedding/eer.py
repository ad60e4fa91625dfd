"""Speaker-verification scoring the standard way: utterance-level embeddings, cosine scores
over trials, equal error rate from the ROC.

A trial is ``(label, path1, path2)`` with label 1 for the same speaker, 0 for different ones.
An utterance's embedding is the embedder's own utterance-level d-vector (the mean of its
partial/window embeddings, as the original's inference computes it); each utterance is
embedded once however many trials it is in.
"""
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reverse_voicefilter.core.audio import load_wav
from reverse_voicefilter.core.errors import UserError

logger = logging.getLogger(__name__)

EMBED_BATCH = 16  # utterances per embed_many call: bounds memory on long recordings


def error_rates(scores, labels):
    """The ROC as detection errors: ``(thresholds, far, frr)``, each [K + 1] for K distinct scores.

    Point 0 accepts no trial (threshold above every score); point k accepts every trial scored
    >= ``thresholds[k]`` (ties move together). far: share of different-speaker trials accepted;
    frr: share of same-speaker trials rejected. far rises from 0 to 1 as frr falls from 1 to 0.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"an EER needs same-speaker and different-speaker trials (got {n_pos} and {n_neg})")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or infinite values")
    distinct, inverse = np.unique(-scores, return_inverse=True)  # descending scores
    pos_at = np.bincount(inverse, weights=labels, minlength=distinct.size)
    neg_at = np.bincount(inverse, weights=~labels, minlength=distinct.size)
    far = np.concatenate([[0.0], np.cumsum(neg_at) / n_neg])
    frr = np.concatenate([[1.0], 1.0 - np.cumsum(pos_at) / n_pos])
    thresholds = np.concatenate([[-distinct[0] + 1.0], -distinct])  # a finite stand-in for +inf first
    return thresholds, far, frr


def equal_error_rate(scores, labels):
    """EER of ``scores`` (higher: more likely the same speaker) against ``labels`` (1 same, 0 different).

    The EER is where the false-acceptance rate meets the false-rejection rate on the ROC of
    :func:`error_rates`, interpolated linearly between the two points that bracket the
    crossing. Returns ``(eer, threshold)``, both floats; the threshold is interpolated the same way.
    """
    thresholds, far, frr = error_rates(scores, labels)
    gap = frr - far  # non-increasing, from 1 down to <= 0
    k = int(np.argmax(gap <= 0))
    if gap[k] == 0:
        return float(far[k]), float(thresholds[k])
    t = gap[k - 1] / (gap[k - 1] - gap[k])
    eer = far[k - 1] + t * (far[k] - far[k - 1])
    return float(eer), float(thresholds[k - 1] + t * (thresholds[k] - thresholds[k - 1]))


def read_trials(path, root=None):
    """A VoxCeleb1-style trial list: ``label path1 path2`` per line (label 1 or 0), ``#`` comments.

    Relative paths are taken from ``root`` (default: the list's folder). Returns a list of
    ``(label, Path, Path)``; a malformed line is a UserError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trial list not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read trial list {path}: {err}") from None
    root = Path(root) if root is not None else path.parent
    trials = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise UserError(f"{path}:{number}: expected 'label path1 path2', got {len(fields)} field(s): {line!r}")
        if fields[0] not in ("0", "1"):
            raise UserError(f"{path}:{number}: the label must be 1 (same speaker) or 0 (different), "
                            f"got {fields[0]!r}")
        trials.append((int(fields[0]), root / fields[1], root / fields[2]))
    if not trials:
        raise UserError(f"{path} holds no trials (expected lines 'label path1 path2')")
    return trials


def folder_trials(speakers, sample=0, seed=0):
    """Trials from ``{speaker: [utterances]}``: every same-speaker and different-speaker pair of
    utterances, or, with ``sample`` > 0, at most ``sample`` of each kind drawn with ``seed``."""
    utterances = [(name, u) for name in sorted(speakers) for u in speakers[name]]
    same, different = [], []
    for (s1, u1), (s2, u2) in itertools.combinations(utterances, 2):
        (same if s1 == s2 else different).append((int(s1 == s2), u1, u2))
    if sample > 0:
        rng = np.random.default_rng(seed)
        same = [same[i] for i in sorted(rng.permutation(len(same))[:sample])]
        different = [different[i] for i in sorted(rng.permutation(len(different))[:sample])]
    return same + different


def embed_utterances(embedder, utterances, load=load_wav, progress=False):
    """``{utterance: unit embedding [E] float64 numpy}`` of each distinct utterance (a path, or
    anything ``load`` turns into 16 kHz samples), through ``embedder.embed_many``."""
    utterances = list(dict.fromkeys(utterances))
    out = {}
    with tqdm(total=len(utterances), unit="utt", desc="embedding", disable=not progress) as bar:
        for start in range(0, len(utterances), EMBED_BATCH):
            chunk = utterances[start:start + EMBED_BATCH]
            emb = embedder.embed_many([load(u) for u in chunk]).double().cpu()
            emb = emb / torch.clamp(torch.norm(emb, dim=1, keepdim=True), min=1e-12)
            out.update(zip(chunk, emb.numpy(), strict=True))
            bar.update(len(chunk))
    return out


def score_trials(embeddings, trials):
    """Cosine scores [T] and labels [T] of ``trials`` from unit ``embeddings`` {utterance: [E]}."""
    scores = np.array([float(embeddings[a] @ embeddings[b]) for _, a, b in trials])
    labels = np.array([label for label, _, _ in trials], dtype=np.int64)
    return scores, labels


def evaluate_trials(embedder, trials, load=load_wav, progress=False):
    """Score ``trials`` with ``embedder`` (a reverse_voicefilter.model.embedder.DvecEmbedder). Returns a dict with
    ``eer``, ``threshold``, ``scores`` and ``labels`` (numpy), the trial counts and
    ``embeddings`` ({utterance: [E]})."""
    embeddings = embed_utterances(embedder, [u for _, a, b in trials for u in (a, b)], load=load,
                                  progress=progress)
    scores, labels = score_trials(embeddings, trials)
    eer, threshold = equal_error_rate(scores, labels)
    return {"eer": eer, "threshold": threshold, "scores": scores, "labels": labels,
            "same_trials": int(labels.sum()), "different_trials": int((labels == 0).sum()),
            "utterances": len(embeddings), "embeddings": embeddings}
