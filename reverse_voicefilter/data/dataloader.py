"""Training and test data: the generator's samples with their cached d-vectors.

A training item is ``(dvec [E], target_mag [T, F], mixed_mag [T, F])``, the
original's order with the reference's d-vector (read from the cache of
:mod:`reverse_voicefilter.data.dvec_cache`) in place of its mel. A test item is ``(dvec, target_mag,
target_wav, mixed_wav)``: the waveforms for SDR, the target magnitude for the
test loss; the mixed magnitude and phase are recomputed from the mixed wav on
the device (``Audio.wav2spec_torch``), so the phase is never stored and the
``-mixed.pt`` is not read.

The training order is a pure function of ``(seed, epoch)`` (a
``DistributedSampler`` permutation, one shard per rank under DDP) and a run
can start in the middle of an epoch: that is what makes resuming exact.
"""
import itertools
import logging
import pickle
import random
import signal

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.dvec_cache import load_dvecs, reference_key
from reverse_voicefilter.data.samples import list_samples

logger = logging.getLogger(__name__)


def read_mag(path, num_freq):
    """A ``torch.save``d magnitude [T, F] (float32 or float16) as float32."""
    try:
        mag = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read spectrogram {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(mag, torch.Tensor) or mag.dim() != 2:
        raise UserError(f"{path} does not hold a [time, freq] spectrogram tensor")
    if mag.size(1) != num_freq:
        raise UserError(f"{path} has {mag.size(1)} frequency bins but the config's audio.num_freq is "
                        f"{num_freq}: generate the data with the same config as training")
    return mag.float()


def read_wav(path, sample_rate):
    """A sample's wav (float32 [N]) as the generator wrote it (no resampling, silence allowed)."""
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot read audio file {path}: {err}") from None
    if rate != sample_rate:
        raise UserError(f"{path} is {rate} Hz but the config's audio.sample_rate is {sample_rate}")
    return torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1)))


class VFDataset(Dataset):
    """Samples of one split with their d-vectors ``dvecs`` [N, E] (row i for sample i)."""

    def __init__(self, samples, dvecs, hp, with_wavs=False):
        assert len(samples) == dvecs.size(0)
        self.samples, self.dvecs, self.hp, self.with_wavs = samples, dvecs, hp, with_wavs

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        s = self.samples[index]
        num_freq = self.hp.audio.num_freq
        if not self.with_wavs:
            return self.dvecs[index], read_mag(s.target_mag, num_freq), read_mag(s.mixed_mag, num_freq)
        # a test item: the mixed magnitude is computed from the mixed wav at validation, so its -mixed.pt
        # (0.7 MB a sample at the default size) is not read
        rate = self.hp.audio.sample_rate
        return (self.dvecs[index], read_mag(s.target_mag, num_freq), read_wav(s.target_wav, rate),
                read_wav(s.mixed_wav, rate))


def build_dataset(hp, split_dir, embedder, with_wavs=False, limit=0, write_cache=True, progress=True):
    """The samples of ``split_dir`` (the first ``limit`` when > 0) and their cached d-vectors."""
    samples = list_samples(split_dir, hp)
    if not samples:
        raise UserError(f"no samples found in {split_dir} (expected NNNNNN{hp.form.mixed.mag.lstrip('*')}, "
                        f"...-target.pt, -mixed.wav, -target.wav and -dvec.txt as generator.py writes them)")
    if limit:
        samples = samples[:limit]
    dvec_of = load_dvecs(samples, split_dir, embedder, hp.audio.sample_rate, write=write_cache, progress=progress)
    dvecs = torch.stack([dvec_of[reference_key(s)] for s in samples])  # [N, E]
    if dvecs.size(1) != hp.embedder.emb_dim:
        raise UserError(f"the embedder gives {dvecs.size(1)}-dim d-vectors but embedder.emb_dim is "
                        f"{hp.embedder.emb_dim}")
    return VFDataset(samples, dvecs, hp, with_wavs=with_wavs)


class ResumableSampler(Sampler):
    """The epoch's shuffled indices (a ``DistributedSampler`` permutation seeded with
    ``seed + epoch``; this rank's shard), started ``start_batch`` batches in.

    ``set_position(epoch, start_batch)`` before iterating; with one process it is
    ``DistributedSampler(num_replicas=1)``, so one code path serves both.
    """

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1):
        self.base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip = 0

    @property
    def batches_per_epoch(self):
        return len(self.base) // self.batch_size

    def set_position(self, epoch, start_batch=0):
        self.base.set_epoch(epoch)
        self.skip = start_batch * self.batch_size

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self):
        return max(0, len(self.base) - self.skip)


def seed_worker(worker_id):
    """Seed numpy/random per worker from torch's per-worker seed; leave Ctrl-C to the
    main process, which checkpoints before exiting."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate_train(batch):
    """Stack ``(dvec, target_mag, mixed_mag)`` items into [B, E], [B, T, F], [B, T, F]."""
    shapes = {tuple(item[2].shape) for item in batch}
    if len(shapes) > 1:
        raise UserError(f"training samples of different lengths in one batch ({sorted(shapes)}): generate "
                        f"the training data with one data.audio_len")
    return tuple(torch.stack(parts) for parts in zip(*batch, strict=True))


def _pad_stack(tensors):
    """Zero-pad along the first dimension to the longest and stack."""
    longest = max(t.size(0) for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest) + tuple(tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.size(0)] = t
    return out


def collate_test(batch):
    """Test items -> ``(dvec [B, E], target_mag [B, T, F], target_wav, mixed_wav [B, N], frames [B],
    lengths [B])``; samples of different lengths are zero-padded (frames and lengths give the true
    sizes)."""
    dvec, target_mag, target_wav, mixed_wav = zip(*batch, strict=True)
    frames = torch.tensor([m.size(0) for m in target_mag])
    lengths = torch.tensor([w.size(0) for w in mixed_wav])
    return (torch.stack(dvec), _pad_stack(target_mag), _pad_stack(target_wav), _pad_stack(mixed_wav), frames,
            lengths)


def create_dataloader(hp, dataset, train, device, seed=0, rank=0, world_size=1):
    """DataLoader of a split: training batches from a :class:`ResumableSampler` (drop_last),
    test batches in order. Workers from train.num_workers, pinned memory on CUDA."""
    workers = hp.train.num_workers
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                  generator=torch.Generator().manual_seed(seed))
    if train:
        sampler = ResumableSampler(dataset, hp.train.batch_size, seed, rank=rank, world_size=world_size)
        if sampler.batches_per_epoch == 0:
            raise UserError(f"the training set has {len(dataset)} samples, fewer than one batch of "
                            f"train.batch_size {hp.train.batch_size} x {world_size} process(es)")
        return DataLoader(dataset, batch_size=hp.train.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=collate_train, persistent_workers=workers > 0, **common)
    return DataLoader(dataset, batch_size=hp.train.batch_size, shuffle=False, collate_fn=collate_test, **common)

