"""SDR: torchmetrics' batched BSS Eval against mir_eval's bss_eval_sources, the original's figure."""
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from mir_eval.separation import bss_eval_sources

from reverse_voicefilter.evaluation.metrics import sdr, sdr_many
from reverse_voicefilter.evaluation.scoring import RESIDUAL, TARGET, score_sample


def mir_eval_sdr(reference, estimate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return float(bss_eval_sources(np.asarray(reference, np.float64)[None], np.asarray(estimate, np.float64)[None],
                                      compute_permutation=False)[0][0])


def quality_test_set(mini):
    """The quality benchmark's 100 test mixtures (test-other, triplets of seed 0), mixed as the official
    path mixes them: the whole clean utterance, the interference cut or zero-padded to it, gain 1."""
    from reverse_voicefilter.bench.quality_data import draw_triplets

    files = {p.name[:-5]: p for p in (mini / "test-other").rglob("*.flac")}
    for clean, _, interference in draw_triplets(mini, 0):
        target = sf.read(files[clean], dtype="float64")[0]
        other = sf.read(files[interference], dtype="float64")[0][:len(target)]
        yield target, target + np.pad(other, (0, len(target) - len(other)))


def distorted(wav, seed):
    """An estimate with the errors a separator makes: filtered, a residue of noise, a gain."""
    rng = np.random.default_rng(seed)
    return 0.7 * np.convolve(wav, [0.6, 0.25, 0.1], mode="same") + 0.05 * wav.std() * rng.standard_normal(len(wav))


@pytest.mark.slow
def test_sdr_equals_mir_eval_on_every_mixture_of_the_test_set(libri_mini):
    count = 0
    for k, (target, mixed) in enumerate(quality_test_set(libri_mini)):
        estimate = distorted(target, k)
        ours = sdr_many([target, target, mixed - target], [mixed, estimate, mixed])
        reference = [mir_eval_sdr(target, mixed), mir_eval_sdr(target, estimate), mir_eval_sdr(mixed - target, mixed)]
        assert np.allclose(ours, reference, rtol=0, atol=1e-3), (k, ours, reference)
        count += 1
    assert count == 100


def test_sdr_on_short_signals_and_silence():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(3000)
    est = ref + 0.3 * rng.standard_normal(3000)
    assert sdr(ref, est) == pytest.approx(mir_eval_sdr(ref, est), abs=1e-3)
    assert np.isnan(sdr(np.zeros(3000), est)) and np.isnan(sdr(ref, np.zeros(3000)))
    values = sdr_many([ref, ref[:2000], np.zeros(10)], [est, est[:2000], est[:10]])  # two lengths, one silent
    assert values[0] == pytest.approx(mir_eval_sdr(ref, est), abs=1e-3)
    assert values[1] == pytest.approx(mir_eval_sdr(ref[:2000], est[:2000]), abs=1e-3) and np.isnan(values[2])


def test_several_pairs_on_several_cpu_threads():
    """torch 2.13's batched solve fails on the CPU with two or more threads (MKL's DLASWP gets
    corrupt pivots): several pairs of one length must still score, each equal to mir_eval's."""
    rng = np.random.default_rng(4)
    refs = [rng.standard_normal(4000) for _ in range(3)]
    ests = [r + 0.3 * rng.standard_normal(4000) for r in refs]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        values = sdr_many(refs, ests)
    finally:
        torch.set_num_threads(threads)
    assert np.allclose(values, [mir_eval_sdr(r, e) for r, e in zip(refs, ests, strict=True)], rtol=0, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sdr_on_cuda_equals_the_cpu():
    rng = np.random.default_rng(2)
    refs = [rng.standard_normal(16000) for _ in range(3)]
    ests = [r + 0.2 * rng.standard_normal(16000) for r in refs]
    assert np.allclose(sdr_many(refs, ests, torch.device("cuda")), sdr_many(refs, ests), atol=1e-6)


def test_a_sample_is_scored_in_one_batch_against_the_right_references():
    rng = np.random.default_rng(3)
    target, other = rng.standard_normal(4000), rng.standard_normal(4000)
    mixed = target + other
    outputs = {"org": target + 0.1 * other, "inv_sub": other + 0.2 * target}
    scores = score_sample((mixed, target, outputs, TARGET))
    assert scores["org"]["sdr_after"] == pytest.approx(mir_eval_sdr(target, outputs["org"]), abs=1e-3)
    assert scores["inv_sub"]["sdr_after"] == pytest.approx(mir_eval_sdr(other, outputs["inv_sub"]), abs=1e-3)
    assert scores["inv_sub"]["sdr_before"] == pytest.approx(mir_eval_sdr(other, mixed), abs=1e-3)
    assert RESIDUAL != TARGET
