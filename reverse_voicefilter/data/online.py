"""On-the-fly mixing: training mixtures made from a corpus root as the trainer asks for them.

``data.mixing: online`` trains straight from LibriSpeech (``data.libri_dir``)
or VoxCeleb (``data.voxceleb_dir``); nothing is written per sample. The
speakers are chosen as generator.py chooses them (:func:`reverse_voicefilter.data.speakers.split_speakers`:
training subsets, the test subsets' speakers left out, hold-out speakers) and
each sample is made by the generator's own code (:mod:`reverse_voicefilter.data.mixing`):

* epoch ``e`` holds ``data.epoch_samples`` mixtures; its plan is
  :func:`reverse_voicefilter.data.mixing.plan_candidates` of the training split seeded with
  ``data.mixing_seed`` and, from epoch 1 on, the epoch. Epoch 0 is therefore
  exactly ``generator.py --seed data.mixing_seed``'s training split: the same
  triplets, the same wavs, sample for sample; later epochs are fresh draws.
* sample ``(e, i)`` depends on ``(mixing_seed, e, i)`` and the data only, so the
  stream is the same whatever the number of loader workers or processes; the
  sampler (a :class:`reverse_voicefilter.data.dataloader.ResumableSampler` that yields
  ``(epoch, index)``) shards it over the ranks and resumes mid-epoch.
* the loader workers return waveforms; :class:`OnlineBatches` turns each batch
  into ``(dvec, target_mag, mixed_mag)`` on the training device: the
  spectrograms in one batched ``Audio.wav2spec_torch`` call, the d-vectors
  from a :class:`ReferenceDvecs` cache that embeds each reference the first time
  it is drawn.
* decoded, trimmed utterances stay in a per-worker LRU cache bounded by
  ``data.audio_cache_mb`` (split over the workers).

The one rule that differs from generator.py's files: the spectrograms come
from ``torch.stft`` on the training device rather than librosa on the CPU, so
they equal the generator's ``.pt`` files to float32 rounding (below 1e-3 in
normalized units), not bit for bit; the wavs are bit for bit the same.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from reverse_voicefilter.core.audio import Audio, load_wav
from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.data.augment import Augmentation
from reverse_voicefilter.data.dataloader import ResumableSampler, seed_worker
from reverse_voicefilter.data.dvec_cache import read_online_shards, write_online_shard
from reverse_voicefilter.data.lengths import header_seconds
from reverse_voicefilter.data.mixing import (
    FALLBACK_LIMIT,
    MAX_ATTEMPTS,
    REFERENCE_MIN_FACTOR,
    SPLIT_CODES,
    Mixer,
    Pools,
    candidates_of,
    fallback_candidates,
    plan_candidates,
    struck_count,
)
from reverse_voicefilter.data.speakers import Speakers, read_speaker_list, split_speakers

logger = logging.getLogger(__name__)

SPLIT = "train"
PLANS_KEPT = 2            # epochs whose plan a worker keeps (the current one and the next)
BYTES_PER_SAMPLE = 4      # float32 audio in the cache


def online_speakers(hp):
    """The training speakers of ``data.libri_dir`` / ``data.voxceleb_dir``, as generator.py picks them."""
    d = hp.data
    holdout = read_speaker_list(d.holdout_speakers) if d.holdout_speakers else ()
    train, _, _ = split_speakers(d.libri_dir or None, d.voxceleb_dir or None, d.input_glob or hp.form.input,
                                 tuple(d.train_subsets), tuple(d.test_subsets), holdout=holdout,
                                 need_train=True, need_test=False)
    speakers = Speakers(train)
    if len(speakers) < 2:
        raise UserError(f"online mixing needs at least two training speakers with two or more "
                        f"'{d.input_glob or hp.form.input}' files, found {len(speakers)}")
    if d.epoch_samples > speakers.triplet_count():
        raise UserError(f"data.epoch_samples is {d.epoch_samples} but the training data holds only "
                        f"{speakers.triplet_count()} distinct (reference, target, interference) triplets")
    return speakers


def cache_entries(hp, workers):
    """How many trimmed utterance heads fit in ``data.audio_cache_mb``, split over the loader processes."""
    entry = int(hp.audio.sample_rate * hp.data.audio_len) * BYTES_PER_SAMPLE
    return max(1, int(hp.data.audio_cache_mb * 2**20 / entry) // max(1, workers))


class OnlineMixtures(Dataset):
    """Training mixtures made on demand: item ``(epoch, index)`` -> ``(reference index, output_wav [L],
    mixed_wav [L])``, the wavs as generator.py would write them (float32)."""

    def __init__(self, hp, speakers, cache_capacity, pools=None):
        d = hp.data
        self.hp, self.speakers, self.pools = hp, speakers, pools
        self.size, self.seed, self.reverse, self.vad = d.epoch_samples, d.mixing_seed, d.reverse_data, d.vad
        self.capacity = cache_capacity
        self.augment = Augmentation.from_hp(hp)
        self._mixer = None      # made in the process that uses it (each loader worker has its own cache)
        self._plans = {}
        self._index_of = None   # reference path -> utterance index

    def __len__(self):
        return self.size

    def plan(self, epoch):
        """The candidates of every sample of ``epoch`` (epoch 0: the generator's plan)."""
        if epoch not in self._plans:
            stream = (epoch,) if epoch else ()
            plan = plan_candidates(self.speakers, self.size, self.seed, SPLIT_CODES[SPLIT], stream)
            while len(self._plans) >= PLANS_KEPT:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan.astype(np.int32)  # half the memory; indices stay far below 2**31
        return self._plans[epoch]

    def mixture(self, epoch, index):
        """The :class:`reverse_voicefilter.data.mixing.Mixture` of sample ``index`` of ``epoch``."""
        if self._mixer is None:
            self._mixer = Mixer(self.hp, self.vad, self.capacity, whole=self.augment.random_crop)
        plan = self.plan(epoch)
        augment = self.augment.draw(self.seed, epoch, index, self.size)
        mixture, drops = self._mixer.mix(self.speakers, index, candidates_of(plan, index), self.reverse,
                                         augment=augment)
        if mixture is None and self.pools is not None:
            # further candidates from the sample's own seed: the stream stays exact, the run goes on
            struck = struck_count(plan, index)
            logger.debug("sample %d of epoch %d: its %d planned candidates were dropped (%d struck as repeats): "
                         "drawing further ones", index, epoch, MAX_ATTEMPTS - struck, struck)
            further = fallback_candidates(self.pools, self.seed, SPLIT_CODES[SPLIT], (epoch,) if epoch else (),
                                          index)
            mixture, more = self._mixer.mix(self.speakers, index, further, self.reverse, limit=FALLBACK_LIMIT,
                                            augment=augment)
            drops += more
        if mixture is None:
            struck = struck_count(plan, index)
            reasons = ", ".join(f"{n} {k}" for k, n in sorted(drops.items())) or "none"
            raise UserError(f"online mixing: all candidates of sample {index} of epoch {epoch} were dropped "
                            f"({reasons}; {struck} struck as repeats): the data has too few utterances long enough "
                            f"for data.audio_len {self.hp.data.audio_len} s; use more data or a shorter audio_len")
        return mixture

    def __getitem__(self, key):
        epoch, index = key
        m = self.mixture(epoch, index)
        if self._index_of is None:
            self._index_of = {path: i for i, path in enumerate(self.speakers.paths)}
        wavs = (np.ascontiguousarray(w, dtype=np.float32) for w in (m.output_wav, m.mixed_wav))
        return (torch.tensor(self._index_of[m.reference]), *(torch.from_numpy(w) for w in wavs))


class EpochSampler(ResumableSampler):
    """:class:`ResumableSampler` whose indices carry their epoch: ``(epoch, index)``, so a loader worker
    knows which epoch's plan a sample belongs to."""

    def __iter__(self):
        epoch = self.base.epoch
        return ((epoch, i) for i in super().__iter__())


class ReferenceDvecs:
    """D-vectors of reference utterances, computed the first time each is drawn, kept in memory and in
    shard files ``dvec-online-<embedder>-r<rank>-<n>.pt`` under ``folder``.

    Each reference is embedded alone (``embed_many([wav])``), so its d-vector is a function of the file
    and the embedder only, never of which other references were new in the same batch: a resumed run
    gets the values an uninterrupted run had, cached or not. Under DDP each rank embeds what its own
    shard draws and writes its own shard files (no rank waits for another); a restart reads every
    rank's files, so a reference is embedded at most once per rank.
    """

    SAVE_EVERY = 1024  # new d-vectors per shard file

    def __init__(self, embedder, folder, sample_rate, rank=0):
        self.embedder, self.folder, self.sample_rate, self.rank = embedder, Path(folder), sample_rate, rank
        self.dvecs = read_online_shards(self.folder, embedder.name)
        self.pending = {}
        self.computed = 0
        if self.dvecs:
            logger.info("d-vectors of %d references read from %s", len(self.dvecs), self.folder)

    def __call__(self, paths):
        """``[B, E]`` float32 on the CPU, one row per reference path."""
        rows = []
        for path in paths:
            dvec = self.dvecs.get(path)
            if dvec is None:
                dvec = self.embedder.embed_many([load_wav(path, self.sample_rate)])[0].float().cpu().clone()
                self.dvecs[path] = self.pending[path] = dvec
                self.computed += 1
            rows.append(dvec)
        if len(self.pending) >= self.SAVE_EVERY:
            self.flush()
        return torch.stack(rows)

    def flush(self):
        """Write the d-vectors computed since the last flush as a new shard file."""
        if self.pending:
            write_online_shard(self.folder, self.embedder.name, self.rank, self.pending)
            self.pending = {}


class OnlineBatches:
    """The training loader of online mixing: batches ``(dvec [B, E], target_mag, mixed_mag [B, T, F])`` on
    ``device``, made from the workers' waveforms. ``sampler`` is the inner loader's, as the loop expects."""

    def __init__(self, loader, speakers, dvecs, audio, device):
        self.loader, self.sampler = loader, loader.sampler
        self.paths, self.dvecs, self.audio, self.device = speakers.paths, dvecs, audio, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        try:
            for reference, target_wav, mixed_wav in self._batches():
                dvec = self.dvecs([self.paths[i] for i in reference.tolist()])
                wavs = torch.cat([target_wav, mixed_wav]).to(self.device, non_blocking=True)  # one STFT call
                target_mag, mixed_mag = self.audio.wav2spec_torch(wavs, phase=False).chunk(2)
                yield dvec, target_mag, mixed_mag
        finally:  # also when the loop leaves mid-epoch (max_steps, a signal): keep what was embedded
            self.dvecs.flush()

    def _batches(self):
        """The inner loader's batches; a user error in a worker stays one line (the loader re-raises it
        with the worker's traceback in its message)."""
        try:
            yield from self.loader
        except UserError as err:
            text = str(err)
            if "Traceback" not in text:
                raise
            raise UserError(text.strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


def online_pools(hp, speakers, cache_dir=None):
    """The :class:`~reverse_voicefilter.data.mixing.Pools` of the training utterances, by their headers."""
    seconds = header_seconds(speakers.paths, cache_dir)
    reference_min = REFERENCE_MIN_FACTOR * hp.embedder.window * hp.audio.hop_length / hp.audio.sample_rate
    return Pools(speakers, seconds, hp.data.audio_len, reference_min)


def create_online_loader(hp, embedder, cache_dir, device, seed=0, rank=0, world_size=1):
    """The online training loader of this process (its shard of every epoch) and its :class:`Speakers`."""
    speakers = online_speakers(hp)
    workers = hp.train.num_workers
    pools = online_pools(hp, speakers, cache_dir)
    pools.check()  # data that cannot make one mixture is refused here, before any compute
    dataset = OnlineMixtures(hp, speakers, cache_entries(hp, workers), pools)
    sampler = EpochSampler(dataset, hp.train.batch_size, seed, rank=rank, world_size=world_size)
    if sampler.batches_per_epoch == 0:
        raise UserError(f"data.epoch_samples {len(dataset)} is fewer than one batch of train.batch_size "
                        f"{hp.train.batch_size} x {world_size} process(es)")
    dataset[(0, 0)]  # make one sample now: unusable data fails here, not in a worker after hours
    loader = DataLoader(dataset, batch_size=hp.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, worker_init_fn=seed_worker,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    dvecs = ReferenceDvecs(embedder, cache_dir, hp.audio.sample_rate, rank)
    logger.info("online mixing from %s: %d training speakers, %d utterances, %d mixtures per epoch "
                "(batches per epoch and process: %d), nothing written per sample",
                hp.data.libri_dir or hp.data.voxceleb_dir, len(speakers), len(speakers.paths), len(dataset),
                sampler.batches_per_epoch)
    return OnlineBatches(loader, speakers, dvecs, Audio(hp), device)
