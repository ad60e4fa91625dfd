"""data.mixing online: the generator's samples made on the fly, deterministic, resumable, nothing written."""
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT
from test_trainer import make_embedder, write_config

from reverse_voicefilter.commands.trainer import main as trainer_main
from reverse_voicefilter.core.audio import Audio
from reverse_voicefilter.core.checkpoint import load_checkpoint
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.data import mixing
from reverse_voicefilter.data.dvec_cache import online_shard_paths
from reverse_voicefilter.data.generation import generate
from reverse_voicefilter.data.online import (
    EpochSampler,
    OnlineMixtures,
    ReferenceDvecs,
    cache_entries,
    create_online_loader,
    online_speakers,
)
from reverse_voicefilter.data.samples import list_samples
from reverse_voicefilter.model.embedder import load_embedder

ONLINE = {"data": {"audio_len": 1.0, "mixing": "online", "train_subsets": ["train-clean-100"],
                   "epoch_samples": 16},
          "train": {"batch_size": 4, "num_workers": 0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A demo corpus, the generator's folders of it (seed 0, and reversed), a config and a tiny embedder."""
    from reverse_voicefilter.prepare.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("online")
    corpus = root / "corpus"
    make_corpus(corpus, subsets={"train-clean-100": (5, 4), "dev-clean": (3, 3)}, seed=3, duration=(2.0, 3.5),
                jobs=1, progress=False)
    config = write_config(root / "online.yaml", {**ONLINE, "data": {**ONLINE["data"], "libri_dir": str(corpus)}})
    hp = HParam(config)
    common = dict(processes=1, seed=0, train_subsets=["train-clean-100"], progress=False)
    generate(hp, corpus, root / "gen", train_size=10, test_size=4, **common)
    generate(hp, corpus, root / "gen-rev", train_size=4, test_size=0, reverse=True, **common)
    make_embedder(root / "embedder.pt", config)
    return root, corpus, config


def _hp(config, **data):
    hp = HParam(config)
    hp.data.update(data)
    return hp


def _read(path):
    return sf.read(path, dtype="float32")[0]


def _dataset(hp):
    return OnlineMixtures(hp, online_speakers(hp), cache_entries(hp, 0))


# ---- the same samples as generator.py -------------------------------------------------------------
def test_epoch_0_is_the_generators_training_split(setup):
    root, _, config = setup
    hp = _hp(config)
    dataset, audio = _dataset(hp), Audio(hp)
    samples = list_samples(root / "gen" / "train", hp)
    assert len(samples) == 10
    for i, sample in enumerate(samples):
        reference, target_wav, mixed_wav = dataset[(0, i)]
        assert dataset.speakers.paths[int(reference)] == sample.dvec_txt.read_text()
        assert torch.equal(target_wav, torch.from_numpy(_read(sample.target_wav)))  # bit for bit
        assert torch.equal(mixed_wav, torch.from_numpy(_read(sample.mixed_wav)))
        # the one difference: torch.stft on the device instead of librosa (float32 rounding)
        mags = audio.wav2spec_torch(torch.stack([target_wav, mixed_wav]))[0]
        for mag, path in zip(mags, (sample.target_mag, sample.mixed_mag), strict=True):
            stored = torch.load(path, weights_only=True)
            assert mag.shape == stored.shape and (mag - stored).abs().max() < 1e-3


def test_reverse_data_is_the_generators_reversed_split(setup):
    root, _, config = setup
    dataset = _dataset(_hp(config, reverse_data=True))
    for i, sample in enumerate(list_samples(root / "gen-rev" / "train", HParam(config))):
        _, output_wav, mixed_wav = dataset[(0, i)]
        assert torch.equal(output_wav, torch.from_numpy(_read(sample.target_wav)))
        assert torch.equal(mixed_wav, torch.from_numpy(_read(sample.mixed_wav)))
    # the mixture is the same as unreversed; the model's target is the interference
    forward, reverse = _dataset(_hp(config)).mixture(0, 1), dataset.mixture(0, 1)
    assert np.array_equal(forward.mixed_wav, reverse.mixed_wav)
    assert np.array_equal(reverse.output_wav, forward.interference_wav)


def test_samples_depend_on_seed_epoch_and_index_only(setup):
    _, _, config = setup
    a, b = _dataset(_hp(config)), _dataset(_hp(config))
    for key in [(1, 3), (0, 3), (2, 0), (1, 3)]:  # any order, a fresh dataset: the same sample
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
    assert not torch.equal(a[(0, 3)][2], a[(1, 3)][2])  # each epoch draws new mixtures
    other_seed = _dataset(_hp(config, mixing_seed=1))
    assert not torch.equal(a[(1, 3)][2], other_seed[(1, 3)][2])


def test_ranks_read_disjoint_shards_of_the_same_stream(setup):
    _, _, config = setup
    dataset = _dataset(_hp(config))
    shards = []
    for rank in (0, 1):
        sampler = EpochSampler(dataset, 4, seed=5, rank=rank, world_size=2)
        sampler.set_position(3)
        shards.append(list(sampler))
    assert all(epoch == 3 for epoch, _ in shards[0] + shards[1])
    assert sorted(i for _, i in shards[0] + shards[1]) == list(range(16))
    resumed = EpochSampler(dataset, 4, seed=5, rank=1, world_size=2)
    resumed.set_position(3, start_batch=1)
    assert list(resumed) == shards[1][4:]


# ---- the loader -----------------------------------------------------------------------------------
def _batches(hp, embedder, cache_dir, epoch=0):
    loader = create_online_loader(hp, embedder, cache_dir, torch.device("cpu"), seed=7)
    loader.sampler.set_position(epoch)
    return list(loader)


def test_zero_and_two_workers_give_the_same_batches(setup, tmp_path):
    root, _, config = setup
    embedder = load_embedder(root / "embedder.pt", HParam(config))
    hp0, hp2 = _hp(config), _hp(config)
    hp2.train.num_workers = 2
    b0, b2 = _batches(hp0, embedder, tmp_path / "a", epoch=1), _batches(hp2, embedder, tmp_path / "b", epoch=1)
    assert len(b0) == len(b2) == 4
    for x, y in zip(b0, b2, strict=True):
        assert [t.shape for t in x] == [(4, 256), (4, 101, 257), (4, 101, 257)]
        assert all(torch.equal(s, t) for s, t in zip(x, y, strict=True))


def test_a_user_error_in_a_worker_stays_one_line(setup, tmp_path, monkeypatch):
    root, _, config = setup
    hp = _hp(config)
    hp.train.num_workers = 2
    embedder = load_embedder(root / "embedder.pt", hp)
    loader = create_online_loader(hp, embedder, tmp_path, torch.device("cpu"))

    def dropped(self, epoch, index):
        raise UserError(f"online mixing: all candidates of sample {index} of epoch {epoch} were dropped")
    monkeypatch.setattr(OnlineMixtures, "mixture", dropped)  # the workers fork with it
    loader.sampler.set_position(1)
    with pytest.raises(UserError) as err:
        list(loader)
    assert str(err.value).startswith("online mixing: all candidates of sample") and "\n" not in str(err.value)


def test_dvecs_are_computed_once_per_reference_and_equal_alone(setup, tmp_path, monkeypatch):
    root, _, config = setup
    hp = _hp(config)
    embedder = load_embedder(root / "embedder.pt", hp)
    calls = []
    original = embedder.embed_many
    monkeypatch.setattr(embedder, "embed_many", lambda wavs: calls.append(len(wavs)) or original(wavs))
    first = _batches(hp, embedder, tmp_path)
    references = {p for p in _dataset(hp).speakers.paths if p in ReferenceDvecs(embedder, tmp_path, 16000).dvecs}
    assert calls and set(calls) == {1} and len(calls) == len(references)  # each reference once, alone
    assert online_shard_paths(tmp_path, embedder.name)
    calls.clear()
    again = _batches(hp, embedder, tmp_path)  # a restart: read back from the shard files
    assert calls == []
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, again, strict=True))


def test_a_small_corpus_is_decoded_once(setup, monkeypatch):
    _, _, config = setup
    hp = _hp(config)
    decoded = []
    original = mixing.load_wav
    monkeypatch.setattr(mixing, "load_wav", lambda path, rate: decoded.append(path) or original(path, rate))
    dataset = _dataset(hp)
    for epoch in range(3):
        for i in range(16):
            dataset[(epoch, i)]
    assert len(decoded) == len(set(decoded)) <= len(dataset.speakers.paths)
    assert cache_entries(hp, 0) == 512 * 2**20 // (16000 * 4)
    assert cache_entries(hp, 2) == cache_entries(hp, 0) // 2  # the bound is for all workers together


# ---- the trainer ----------------------------------------------------------------------------------
def _train(root, config, name, *extra):
    return trainer_main(["-c", str(config), "-e", str(root / "embedder.pt"), "-m", name, "-b", str(root / "runs"),
                         "--test_dir", str(root / "gen" / "test"), "--device", "cpu", *extra])


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_resume_is_exact_and_nothing_is_written_per_sample(setup):
    root, corpus, config = setup
    config = write_config(root / "resume.yaml", {**ONLINE, "data": {**ONLINE["data"], "libri_dir": ""},
                                                 "train": {**ONLINE["train"], "max_steps": 6,
                                                           "checkpoint_interval": 3}})
    corpus_before = _files(corpus)
    assert _train(root, config, "straight", "--libri_dir", str(corpus)) == 0
    chkpt = root / "runs" / "chkpt"
    assert _train(root, config, "resumed", "--libri_dir", str(corpus),
                  "--checkpoint_path", str(chkpt / "straight" / "chkpt_3.pt")) == 0
    straight, resumed = load_checkpoint(chkpt / "straight" / "chkpt_6.pt"), load_checkpoint(
        chkpt / "resumed" / "chkpt_6.pt")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # step 6 is mid-epoch 1 (4 batches per epoch): the stream went on into a fresh epoch
    assert (straight["epoch"], straight["batch_in_epoch"]) == (1, 2)
    assert HParam.from_string(straight["hp_str"]).data.mixing == "online"
    # nothing per sample: the corpus is untouched, the run folder holds checkpoints and d-vector shards
    assert _files(corpus) == corpus_before
    names = _files(chkpt / "straight")
    assert {"chkpt_3.pt", "chkpt_6.pt", "best.pt", "config.yaml"} <= set(names)
    # per run, not per sample: the d-vector shards and the headers' lengths (data/lengths.py)
    assert all(n in ("chkpt_3.pt", "chkpt_6.pt", "best.pt", "config.yaml", "lengths.json") or
               n.startswith("dvec-online-ge2e-") or n.startswith(".lock") for n in names)


@pytest.mark.parametrize("data, flags, message", [
    ({}, [], "data.libri_dir and data.voxceleb_dir are empty"),
    ({}, ["--libri_dir", "/nonexistent/libri"], "data.libri_dir folder not found: /nonexistent/libri"),
    ({"mixing": "precomputed", "train_dir": "x"}, ["--reverse_data"], "applies to online mixing"),
    ({"mixing": "sometimes"}, [], "data.mixing must be one of precomputed, online"),
    ({}, ["--libri_dir", "/a", "--voxceleb_dir", "/b"], "data.libri_dir and data.voxceleb_dir are both set"),
])
def test_user_errors_are_one_line(setup, tmp_path, capsys, data, flags, message):
    root, _, _ = setup
    config = write_config(tmp_path / "c.yaml", {**ONLINE, "data": {**ONLINE["data"], "libri_dir": "", **data}})
    with pytest.raises(SystemExit) as exit_status:
        run_cli(lambda argv: _train(root, config, "bad", "-b", str(tmp_path), *flags))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_status.value.code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_too_many_epoch_samples_for_the_data_is_an_error(setup):
    _, _, config = setup
    with pytest.raises(UserError, match="distinct"):
        online_speakers(_hp(config, epoch_samples=10**9))


# ---- real speech ----------------------------------------------------------------------------------
def test_online_equals_generator_on_librispeech_mini(libri_mini, tmp_path):
    hp = HParam(ROOT / "config" / "tiny.yaml")
    hp.data.update(mixing="online", libri_dir=str(libri_mini), train_subsets=["test-other"], test_subsets=[],
                   input_glob="*.flac", epoch_samples=6)
    generate(hp, libri_mini, tmp_path, train_size=6, test_size=0, processes=1, seed=0, input_glob="*.flac",
             train_subsets=["test-other"], test_subsets=["dev-clean"], progress=False)
    dataset = _dataset(hp)
    assert len(dataset.speakers) == 10
    for i, sample in enumerate(list_samples(tmp_path / "train", hp)):
        _, target_wav, mixed_wav = dataset[(0, i)]
        assert torch.equal(target_wav, torch.from_numpy(_read(sample.target_wav)))
        assert torch.equal(mixed_wav, torch.from_numpy(_read(sample.mixed_wav)))


@pytest.mark.slow
def test_ddp_two_processes_each_read_and_embed_their_own_shard(setup, tmp_path):
    import os
    import subprocess
    import sys

    root, corpus, _ = setup
    config = write_config(tmp_path / "ddp.yaml", {**ONLINE, "data": {**ONLINE["data"], "libri_dir": str(corpus)},
                                                  "train": {**ONLINE["train"], "max_steps": 3}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "trainer.py"), "-c", str(config), "-e", str(root / "embedder.pt"), "-m", "ddp",
           "-b", str(tmp_path), "--test_dir", str(root / "gen" / "test"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    chkpt = tmp_path / "chkpt" / "ddp"
    state = load_checkpoint(chkpt / "chkpt_3.pt")
    assert state["step"] == 3 and state["world_size"] == 2 and state["epoch"] == 1  # 16 samples: 2 batches/rank
    ranks = {p.name.split("-r")[-1].split("-")[0] for p in chkpt.glob("dvec-online-*.pt")}
    assert ranks == {"0", "1"}


# ---- never short of candidates -------------------------------------------------------------------------
def _first_speakers_root(mini, count, tmp_path):
    """A librispeech-mini holding the first ``count`` train-clean-100 speakers by id (and test-other)."""
    root = tmp_path / "mini"
    (root / "train-clean-100").mkdir(parents=True)
    speakers = sorted((p for p in (mini / "train-clean-100").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    for folder in speakers[:count]:
        (root / "train-clean-100" / folder.name).symlink_to(folder)
    (root / "test-other").symlink_to(mini / "test-other")
    return root


@pytest.mark.slow
def test_a_small_pool_of_short_pieces_never_stops_the_epoch(libri_mini, tmp_path):
    """The GPU run's failure rebuilt on the CPU: 104 speakers of train-clean-100 cut at pauses as the
    quality benchmark cuts them (many pieces shorter than 3 s), audio_len 3.0, 4000 mixtures an epoch.
    Before, sample 3739 of epoch 0 had all its candidates dropped (28 of 32 struck as repeats) and the
    trainer stopped; now every sample of two epochs is made, each the same whoever makes it."""
    from reverse_voicefilter.bench.quality_data import write_training_pieces
    from reverse_voicefilter.data.online import online_pools

    pieces = tmp_path / "pieces"
    write_training_pieces(_first_speakers_root(libri_mini, 104, tmp_path), pieces)
    hp = HParam(ROOT / "config" / "default.yaml")
    hp.data.update({"mixing": "online", "libri_dir": str(pieces), "train_subsets": ["train-clean-100"],
                    "test_subsets": [], "input_glob": "*.wav", "epoch_samples": 4000, "audio_len": 3.0})
    speakers = online_speakers(hp)
    pools = online_pools(hp, speakers, tmp_path / "cache")
    pools.check()
    dataset = OnlineMixtures(hp, speakers, 4096, pools)
    fallbacks = []
    for epoch in (0, 1):
        plan = dataset.plan(epoch)
        for index in range(len(dataset)):
            reference, output, mixed = dataset[(epoch, index)]
            assert output.shape == mixed.shape == (48000,) and torch.isfinite(mixed).all()
            if epoch == 0 and len(fallbacks) < 5 and mixing.struck_count(plan, index) > 20:
                fallbacks.append((index, mixed))
    assert fallbacks, "the case must hold samples that lost most of their candidates to repeats"
    again = OnlineMixtures(hp, speakers, 16, pools)  # another process (worker, resumed run): the same samples
    for index, mixed in fallbacks:
        assert torch.equal(again[(0, index)][2], mixed)
    assert (tmp_path / "cache" / "lengths.json").is_file()


def test_data_that_cannot_make_one_mixture_is_refused_before_any_compute(setup, tmp_path):
    root, corpus, config = setup
    hp = _hp(config, libri_dir=str(corpus), audio_len=60.0)  # every utterance of the corpus is shorter
    with pytest.raises(UserError, match=r"cannot make a single mixture.*data\.audio_len 60 s"):
        create_online_loader(hp, load_embedder("resemblyzer", hp), tmp_path / "cache", torch.device("cpu"))


def test_pools_check_needs_two_different_speakers():
    class Two:
        offsets, counts = np.array([0, 2]), np.array([2, 2])
    ok = mixing.Pools(Two(), [5.0, 5.0, 5.0, 5.0], 3.0, 0.9)
    ok.check()
    with pytest.raises(UserError):  # only speaker 0's utterances are long enough: no interference
        mixing.Pools(Two(), [5.0, 5.0, 1.0, 1.0], 3.0, 0.9).check()
    mixing.Pools(Two(), [5.0, 1.0, 5.0, 1.0], 3.0, 0.9).check()  # ref 1 s is fine: a target needs 3 s


# ---- augmentation (docs/recipes.md) -----------------------------------------------------------------------
def test_augmentation_draws_are_a_function_of_the_sample_and_the_curriculum_falls_to_zero():
    from reverse_voicefilter.data.augment import Augmentation, window

    assert Augmentation().draw(0, 0, 5, 100) is None  # off: the original's recipe, nothing drawn
    aug = Augmentation(random_crop=True, gain_db=6.0)
    first = aug.draw(3, 1, 7, 100)
    assert first == aug.draw(3, 1, 7, 100) and first != aug.draw(3, 1, 8, 100)
    assert all(0 <= u < 1 for u in first[:2]) and 10 ** (-6 / 20) <= first[2] <= 10 ** (6 / 20)
    curriculum = Augmentation(snr_start_db=10.0, snr_samples=400)
    gains = [curriculum.draw(0, e, i, 100)[2] for e, i in ((0, 0), (1, 0), (3, 99), (4, 0), (9, 50))]
    assert gains[0] == pytest.approx(10 ** (-10 / 20)) and gains[0] < gains[1] < gains[2] < 1.0
    assert gains[3] == gains[4] == 1.0
    audio = np.arange(10.0)
    assert window(audio, 4, None).tolist() == [0, 1, 2, 3] and window(audio, 4, 0.999).tolist() == [6, 7, 8, 9]


def test_augmented_samples_are_the_same_in_any_process_and_differ_from_the_original(setup):
    root, corpus, config = setup
    plain = _hp(config, libri_dir=str(corpus))
    augmented = _hp(config, libri_dir=str(corpus), crop="random", gain_db=6.0, snr_start_db=10.0, snr_steps=2)
    speakers = online_speakers(plain)
    a, b = OnlineMixtures(augmented, speakers, 8), OnlineMixtures(augmented, speakers, 64)
    original = OnlineMixtures(plain, speakers, 8)
    for key in ((0, 0), (0, 3), (1, 2)):
        ref_a, out_a, mixed_a = a[key]
        ref_b, out_b, mixed_b = b[key]
        assert int(ref_a) == int(ref_b) and torch.equal(out_a, out_b) and torch.equal(mixed_a, mixed_b)
        assert not torch.equal(mixed_a, original[key][2])
        assert mixed_a.abs().max() <= 1 / mixing.NORM_HEADROOM + 1e-6
