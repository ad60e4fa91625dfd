"""embedder_trainer.py: the GE2E loss, learning on the demo corpus and on real speech, exact
resume, Ctrl-C, the embedder file it writes (read by -e everywhere), and its errors."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from test_inference import one_torch_thread  # noqa: F401  (autouse: one thread here too)
from test_trainer import read_events as read_scalars

from reverse_voicefilter.commands.embedder_trainer import main as trainer_main
from reverse_voicefilter.core.checkpoint import load_checkpoint
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.embedding.config import load_ge2e_config
from reverse_voicefilter.embedding.data import split_into_crops
from reverse_voicefilter.embedding.ge2e import GE2ELoss
from reverse_voicefilter.model.embedder import RESEMBLYZER, SpeechEmbedder, load_embedder

SCRIPT_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from reverse_voicefilter.prepare.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("ge2e-corpus")
    make_corpus(root, {"train-clean-100": (8, 4), "dev-clean": (4, 4)}, duration=(1.5, 2.0), jobs=1, progress=False)
    return root


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """Utterances long enough for the mixture generator (4-6 s)."""
    from reverse_voicefilter.prepare.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("long-corpus")
    make_corpus(root, {"train-clean-100": (3, 3), "dev-clean": (3, 3)}, jobs=1, progress=False)
    return root


def write_config(path, ge2e=None, embedder=None, base="ge2e-tiny.yaml", data=None):
    """config/tiny.yaml (a VoiceFilter small enough for the tests) + a GE2E config, with overrides."""
    sections = {}
    for name in ("tiny.yaml", base):
        for doc in yaml.safe_load_all((ROOT / "config" / name).read_text()):
            for key, values in (doc or {}).items():
                sections.setdefault(key, {}).update(values)
    sections["embedder"].update(embedder or {})
    sections["ge2e"].update(ge2e or {})
    sections["data"].update(data or {})
    path.write_text("---\n".join(yaml.safe_dump({k: v}) for k, v in sections.items()))
    return path


def voicefilter_config(ge2e_config):
    """The same config without its ge2e section, for trainer.py, generator.py and inference.py."""
    sections = {k: v for doc in yaml.safe_load_all(ge2e_config.read_text()) for k, v in doc.items() if k != "ge2e"}
    path = ge2e_config.with_name(ge2e_config.stem + "-voicefilter.yaml")
    path.write_text("---\n".join(yaml.safe_dump({k: v}) for k, v in sections.items()))
    return path


def train(root, name, config, *extra, corpus_dir):
    return trainer_main(["-c", str(config), "-m", name, "-b", str(root), "--libri_dir", str(corpus_dir),
                         "--device", "cpu", *map(str, extra)])


# ---- the loss ---------------------------------------------------------------------------------------
def test_ge2e_loss_follows_the_paper_definition():
    torch.manual_seed(0)
    emb = torch.randn(3, 4, 5)
    loss_fn = GE2ELoss(init_w=7.0, init_b=-2.0)
    total = 0.0
    for j in range(3):
        for i in range(4):
            e = emb[j, i]
            sims = []
            for k in range(3):
                others = [emb[k, m] for m in range(4) if not (k == j and m == i)]  # eq. 8: own centroid without e
                c = torch.stack(others).mean(0)
                sims.append(7.0 * torch.cosine_similarity(e, c, dim=0) - 2.0)
            sims = torch.stack(sims)
            total += -sims[j] + torch.logsumexp(sims, 0)
    torch.testing.assert_close(loss_fn(emb), total / 12)


def test_w_and_b_gradients_are_scaled():
    loss_fn = GE2ELoss()
    loss_fn(torch.randn(3, 2, 4)).backward()
    w, b = loss_fn.w.grad.clone(), loss_fn.b.grad.clone()
    loss_fn.scale_gradients(0.01)
    torch.testing.assert_close((loss_fn.w.grad, loss_fn.b.grad), (w * 0.01, b * 0.01))


def test_split_into_crops_cuts_disjoint_pieces(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "long.wav", np.zeros(16000 * 5 + 100, dtype=np.float32), 16000)
    crops = split_into_crops([str(tmp_path / "long.wav")], 16000 * 2)
    assert [(c.start, c.stop) for c in crops] == [(0, 32000), (32000, 64000)]


def test_speakers_of_librispeech_and_voxceleb_together(corpus, tmp_path):
    from reverse_voicefilter.embedding.data import find_training_speakers

    for speaker in range(4):
        for utt in range(2):
            path = tmp_path / "vox" / f"id1000{speaker}" / "video" / f"0000{utt}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    (tmp_path / "holdout.txt").write_text("1001\n")
    hp = load_ge2e_config(write_config(tmp_path / "c.yaml", {
        "libri_dir": str(corpus), "vox_dir": str(tmp_path / "vox"), "input_glob": "*.wav",
        "holdout_list": str(tmp_path / "holdout.txt")}))
    train, val = find_training_speakers(hp.ge2e)
    assert sorted(val) == ["2001", "2002", "2003", "2004", "id10002", "id10003"]  # dev-clean + VoxCeleb's last
    assert sorted(train) == [str(s) for s in range(1002, 1009)] + ["id10000", "id10001"]  # 1001 held out
    assert all(len(v) == 2 for k, v in train.items() if k.startswith("id"))


def test_batches_depend_on_seed_and_step_only_with_or_without_workers(corpus):
    from reverse_voicefilter.embedding.data import BatchSource, find_training_speakers, utterance_lists

    hp = load_ge2e_config(ROOT / "config" / "ge2e-tiny.yaml")
    hp.ge2e.libri_dir = str(corpus)
    utts = utterance_lists(find_training_speakers(hp.ge2e)[0], False, 8000)
    source = BatchSource(utts, 3, 2, 8000, seed=5, volume_normalize=False, cache_audio=False)
    loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=range(7, 10), num_workers=1)
    batches = list(loader)
    assert all(torch.equal(b, source[7 + i]) for i, b in enumerate(batches)) and batches[0].shape == (6, 8000)
    assert not torch.equal(source[7], source[8])
    other_seed = BatchSource(utts, 3, 2, 8000, seed=6, volume_normalize=False, cache_audio=False)
    assert not torch.equal(source[7], other_seed[7])


# ---- learning ---------------------------------------------------------------------------------------
def test_loss_and_heldout_eer_fall_on_the_demo_corpus(corpus, tmp_path):
    config = write_config(tmp_path / "learn.yaml", {"checkpoint_interval": 150})
    assert train(tmp_path, "learn", config, corpus_dir=corpus) == 0
    losses = [v for _, v in sorted(read_scalars(tmp_path / "logs" / "learn")["train_loss"])]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # from ln 8 = 2.08
    history = load_checkpoint(tmp_path / "chkpt" / "learn" / "chkpt_150.pt")["eer_history"]
    assert [s for s, _ in history] == [0, 150]
    assert history[0][1] > 0.4 and history[-1][1] < history[0][1] - 0.1  # measured 0.50 -> 0.29
    tags = read_scalars(tmp_path / "logs" / "learn")
    assert {"train_loss", "learning_rate", "validation_EER"} <= set(tags)
    assert (tmp_path / "logs" / "learn" / "projector_config.pbtxt").is_file()
    assert (tmp_path / "chkpt" / "learn" / "config.yaml").is_file()


@pytest.mark.slow
def test_heldout_eer_falls_on_librispeech_with_split_utterances(libri_mini, tmp_path):
    """train-clean-100 of librispeech-mini holds one long utterance per speaker: its disjoint crops
    are the speaker's utterances; the held-out speakers are test-other's."""
    config = write_config(tmp_path / "libri.yaml", {
        "input_glob": "*.flac", "val_subsets": "test-other", "split_long_utterances": True,
        "crop_frames": 120, "speakers_per_batch": 16, "utterances_per_speaker": 4, "max_steps": 200,
        "checkpoint_interval": 200, "val_utterances": 4, "lr": 0.002})
    assert train(tmp_path, "libri", config, "--threads", 1, corpus_dir=libri_mini) == 0
    history = load_checkpoint(tmp_path / "chkpt" / "libri" / "chkpt_200.pt")["eer_history"]
    assert history[-1][1] < history[0][1] - 0.1
    losses = [v for _, v in sorted(read_scalars(tmp_path / "logs" / "libri")["train_loss"])]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2  # from ln 16 = 2.77


# ---- resume, files ---------------------------------------------------------------------------------
ARCHS = {"original": {"lstm_hidden": 16, "lstm_layers": 3, "emb_dim": 8},
         RESEMBLYZER: {"lstm_hidden": 16, "lstm_layers": 2, "emb_dim": 8}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resume_is_exact(corpus, tmp_path, arch):
    config = write_config(tmp_path / "c.yaml", {"architecture": arch, "max_steps": 4, "checkpoint_interval": 2,
                                                "speakers_per_batch": 3, "utterances_per_speaker": 2},
                          embedder=ARCHS[arch])
    assert train(tmp_path / "a", "x", config, corpus_dir=corpus) == 0
    assert train(tmp_path / "b", "x", config, "--checkpoint_path", tmp_path / "a" / "chkpt" / "x" / "chkpt_2.pt",
                 corpus_dir=corpus) == 0
    straight = load_checkpoint(tmp_path / "a" / "chkpt" / "x" / "chkpt_4.pt")
    resumed = load_checkpoint(tmp_path / "b" / "chkpt" / "x" / "chkpt_4.pt")
    for part in ("model", "ge2e"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key}"
    for key, value in straight["optimizer"]["state"].items():
        assert all(torch.equal(v, resumed["optimizer"]["state"][key][n]) for n, v in value.items())
    files = [torch.load(tmp_path / run / "chkpt" / "x" / "embedder.pt", weights_only=True) for run in "ab"]
    if arch == RESEMBLYZER:
        assert files[0]["step"] == files[1]["step"] == 4
        files = [f["model_state"] for f in files]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_embedder_file_has_the_original_key_layout(corpus, tmp_path, parity_dir):
    config = write_config(tmp_path / "c.yaml", {"max_steps": 1, "speakers_per_batch": 3, "utterances_per_speaker": 2},
                          embedder=ARCHS["original"])
    assert train(tmp_path, "x", config, corpus_dir=corpus) == 0
    written = torch.load(tmp_path / "chkpt" / "x" / "embedder.pt", weights_only=True)
    original = torch.load(parity_dir / "embedder.pt", weights_only=True)
    assert list(written) == list(original)  # same keys, same order: a bare state_dict as the original's
    net = SpeechEmbedder(load_ge2e_config(config))
    net.load_state_dict(written)  # and the original's module loads it


def test_resemblyzer_file_is_resemblyzers_format(corpus, tmp_path):
    config = write_config(tmp_path / "c.yaml", {"architecture": RESEMBLYZER, "max_steps": 1,
                                                "speakers_per_batch": 3, "utterances_per_speaker": 2},
                          embedder=ARCHS[RESEMBLYZER])
    assert train(tmp_path, "x", config, corpus_dir=corpus) == 0
    written = torch.load(tmp_path / "chkpt" / "x" / "embedder.pt", weights_only=True)
    assert written["step"] == 1
    assert {k.split(".")[0] for k in written["model_state"]} == {"similarity_weight", "similarity_bias", "lstm",
                                                                  "linear"}
    embedder = load_embedder(tmp_path / "chkpt" / "x" / "embedder.pt", load_ge2e_config(config))
    assert embedder.kind == RESEMBLYZER
    assert embedder.embed(np.random.default_rng(0).standard_normal(24000)).shape == (8,)


@pytest.mark.parametrize("state, message", [
    ({"model_state": {"lstm.weight_hh_l0": torch.zeros(4, 1)}}, "not a resemblyzer encoder's"),
    ({"step": 1, "model_state": {}}, "not a resemblyzer encoder's"),
])
def test_broken_resemblyzer_format_file_is_a_user_error(tmp_path, state, message):
    torch.save(state, tmp_path / "e.pt")
    with pytest.raises(UserError, match=message):
        load_embedder(tmp_path / "e.pt", HParam())


def test_resemblyzer_format_file_of_another_size_is_a_user_error(tmp_path):
    from reverse_voicefilter.model.embedder import ResemblyzerEncoder, resemblyzer_format

    torch.save(resemblyzer_format(ResemblyzerEncoder(hidden=8, layers=1, emb_dim=8), 0), tmp_path / "e.pt")
    with pytest.raises(UserError, match="gives 8-dim d-vectors but embedder.emb_dim is 256"):
        load_embedder(tmp_path / "e.pt", HParam())


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=SCRIPT_ENV)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_written_embedder_works_with_e_in_trainer_and_inference(corpus, long_corpus, tmp_path, arch):
    config = write_config(tmp_path / "c.yaml", {"architecture": arch, "max_steps": 2, "speakers_per_batch": 3,
                                                "utterances_per_speaker": 2}, embedder=ARCHS[arch],
                          data={"audio_len": 1.0})
    assert train(tmp_path, "emb", config, corpus_dir=corpus) == 0
    embedder = tmp_path / "chkpt" / "emb" / "embedder.pt"
    config = voicefilter_config(config)  # the same embedder section
    proc = run_script("generator.py", "-c", config, "-d", long_corpus, "-o", tmp_path / "data", "-p", 1,
                      "--train_size", 8, "--test_size", 2, "--train_subsets", "train-clean-100",
                      "--test_subsets", "dev-clean", "--input_glob", "*-norm.wav")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("trainer.py", "-c", config, "-e", embedder, "-m", "vf", "-b", tmp_path, "--max_steps", 1,
                      "--train_dir", tmp_path / "data" / "train", "--test_dir", tmp_path / "data" / "test",
                      "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mixed = sorted((tmp_path / "data" / "test").glob("*-mixed.wav"))[0]
    reference = sorted((long_corpus / "dev-clean").rglob("*-norm.wav"))[0]
    proc = run_script("inference.py", "-c", config, "-e", embedder, "--checkpoint_path",
                      tmp_path / "chkpt" / "vf" / "chkpt_1.pt", "-m", mixed, "-r", reference, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "result.wav").is_file()


def test_fine_tuning_starts_from_resemblyzers_weights(corpus, tmp_path):
    from reverse_voicefilter.embedding.eer import evaluate_trials
    from reverse_voicefilter.embedding.train import load_utterance, validation_set

    config = write_config(tmp_path / "c.yaml", {"architecture": RESEMBLYZER, "init": "resemblyzer", "max_steps": 1,
                                                "speakers_per_batch": 2, "utterances_per_speaker": 2,
                                                "checkpoint_interval": 1},
                          embedder={"lstm_hidden": 256, "lstm_layers": 3, "emb_dim": 256})
    assert train(tmp_path, "ft", config, corpus_dir=corpus) == 0
    hp = load_ge2e_config(config)
    hp.ge2e.libri_dir = str(corpus)
    from reverse_voicefilter.embedding.data import find_training_speakers
    trials = validation_set(hp, find_training_speakers(hp.ge2e)[1])
    expected = evaluate_trials(load_embedder("resemblyzer", hp), trials, load=load_utterance)["eer"]
    history = load_checkpoint(tmp_path / "chkpt" / "ft" / "chkpt_1.pt")["eer_history"]
    assert history[0] == [0, pytest.approx(expected)]


# ---- stopping and errors ---------------------------------------------------------------------------
def test_ctrl_c_writes_a_checkpoint_that_resumes(corpus, tmp_path):
    config = write_config(tmp_path / "c.yaml", {"max_steps": 0, "checkpoint_interval": 100000})
    proc = subprocess.Popen([sys.executable, str(ROOT / "embedder_trainer.py"), "-c", str(config), "-m", "int",
                             "-b", str(tmp_path), "--libri_dir", str(corpus), "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SCRIPT_ENV)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any("step 0: validation EER" in line for line in lines):
            time.sleep(0.2)
        time.sleep(2)  # into the steps
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    saved = sorted((tmp_path / "chkpt" / "int").glob("chkpt_*.pt"))
    assert len(saved) == 1 and "resume with --checkpoint_path" in err
    step = load_checkpoint(saved[0])["step"]
    assert step >= 1 and saved[0].name == f"chkpt_{step}.pt"
    assert (tmp_path / "chkpt" / "int" / "embedder.pt").is_file()
    assert train(tmp_path, "int", config, "--checkpoint_path", saved[0], "--max_steps", step + 1,
                 corpus_dir=corpus) == 0
    assert load_checkpoint(tmp_path / "chkpt" / "int" / f"chkpt_{step + 1}.pt")["step"] == step + 1


@pytest.mark.parametrize("case", ["no data folder", "too few speakers", "bad architecture", "foreign checkpoint"])
def test_user_errors(corpus, tmp_path, case):
    overrides = {"too few speakers": {"speakers_per_batch": 9}, "bad architecture": {"architecture": "xvector"}}
    config = write_config(tmp_path / "c.yaml", overrides.get(case, {}))
    extra = []
    if case == "foreign checkpoint":
        torch.save({"model": {}, "step": 3}, tmp_path / "vf.pt")
        extra = ["--checkpoint_path", tmp_path / "vf.pt"]
    data = tmp_path / "nope" if case == "no data folder" else corpus
    expected = {"no data folder": "data folder not found", "too few speakers": "only 8 training speakers",
                "bad architecture": "ge2e.architecture must be one of",
                "foreign checkpoint": "not an embedder_trainer.py checkpoint"}[case]
    with pytest.raises(UserError, match=expected):
        train(tmp_path, "x", config, *extra, corpus_dir=data)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.yaml", *(["vf.pt"] if extra else [])])


@pytest.mark.parametrize("text, message", [
    ("ge2e:\n  speakers_per_batch: 'many'\n", r"c.yaml: 'ge2e.speakers_per_batch' must be int"),
    ("ge2e:\n  learning_rate: 0.1\n", r"c.yaml: unknown key 'ge2e.learning_rate'"),
    ("embedder:\n  lstm_hiden: 3\n", r"c.yaml: unknown key 'embedder.lstm_hiden'"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_ge2e_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config").glob("ge2e-*.yaml")))
def test_shipped_ge2e_configs_are_valid(name):
    from reverse_voicefilter.embedding.train import check_config

    check_config(load_ge2e_config(ROOT / "config" / name))


def test_config_round_trips_through_hp_str(tmp_path):
    hp = load_ge2e_config(write_config(tmp_path / "c.yaml", {"lr": 0.5}))
    again = load_ge2e_config(text=hp.hp_str)
    assert again == hp and again.ge2e.lr == 0.5 and again.ge2e.val_utterances == 4
    assert "ge2e" not in HParam()  # VoiceFilter configs are unchanged


def test_cli_error_is_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    proc = run_script("embedder_trainer.py", "-c", config, "-m", "x", "-b", tmp_path, "--libri_dir", tmp_path / "no")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr


# ---- one run per folder, run names ------------------------------------------------------------------
def cli(capsys, root, name, config, *extra, corpus_dir):
    """embedder_trainer.py's main as the script runs it: (exit status, the error lines on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        run_cli(lambda _: train(root, name, config, *extra, corpus_dir=corpus_dir))
    return exit_status.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def small_config(path, **ge2e):
    return write_config(path, {"speakers_per_batch": 3, "utterances_per_speaker": 2, **ge2e},
                        embedder=ARCHS["original"])


def test_a_new_run_over_a_finished_one_is_refused_and_overwrite_starts_over(corpus, tmp_path, capsys):
    config = small_config(tmp_path / "c.yaml", max_steps=4, checkpoint_interval=2)
    assert train(tmp_path, "x", config, corpus_dir=corpus) == 0
    folder = tmp_path / "chkpt" / "x"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"chkpt_2.pt", "chkpt_4.pt", "embedder.pt", "config.yaml"}
    code, errors = cli(capsys, tmp_path, "x", config, corpus_dir=corpus)
    assert code == 2 and len(errors) == 1, errors
    assert f"--checkpoint_path {folder / 'chkpt_4.pt'}" in errors[0] and "--overwrite" in errors[0]
    assert "embedder.pt" in errors[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced, nothing added
    code, errors = cli(capsys, tmp_path, "x", config, "--overwrite", "--checkpoint_path", folder / "chkpt_4.pt",
                       corpus_dir=corpus)
    assert code == 2 and "leave it out" in errors[0]
    # --overwrite: a new run, alone in the folder
    assert train(tmp_path, "x", config, "--overwrite", "--max_steps", 2, corpus_dir=corpus) == 0
    assert {p.name for p in folder.iterdir()} == {"chkpt_2.pt", "embedder.pt", "config.yaml"}
    assert load_checkpoint(folder / "chkpt_2.pt")["step"] == 2


def test_a_second_run_in_a_locked_run_folder_is_refused(corpus, tmp_path, capsys):
    from test_runlock import lock_holder

    config = small_config(tmp_path / "c.yaml", max_steps=1)
    folder = tmp_path / "chkpt" / "x"
    with lock_holder(folder) as holder:
        code, errors = cli(capsys, tmp_path, "x", config, corpus_dir=corpus)
        assert code == 2 and len(errors) == 1
        assert errors[0].startswith(f"error: {folder} is in use by another run (process {holder.pid} on ")
        assert sorted(p.name for p in folder.iterdir()) == [".lock"] and not (tmp_path / "logs").exists()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert train(tmp_path, "x", config, corpus_dir=corpus) == 0
    assert {p.name for p in folder.iterdir()} == {"chkpt_1.pt", "embedder.pt", "config.yaml"}


@pytest.mark.parametrize("name", ["../victim", "", "a/b", ".."])
def test_run_name_must_be_one_plain_folder_name(corpus, tmp_path, capsys, name):
    config = small_config(tmp_path / "c.yaml", max_steps=1)
    base = tmp_path / "base"
    code, errors = cli(capsys, base, name, config, "--overwrite", corpus_dir=corpus)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: -m {name!r} is not a run name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_folder_given_as_the_checkpoint_says_so(corpus, tmp_path, capsys):
    config = small_config(tmp_path / "c.yaml", max_steps=1)
    (tmp_path / "old" / "chkpt_7.pt").parent.mkdir()
    (tmp_path / "old" / "chkpt_7.pt").write_bytes(b"")
    code, errors = cli(capsys, tmp_path, "x", config, "--checkpoint_path", tmp_path / "old", corpus_dir=corpus)
    assert code == 2 and errors == [f"error: --checkpoint_path {tmp_path / 'old'} is a folder, not a checkpoint: "
                                    f"give a checkpoint file (chkpt_STEP.pt), e.g. {tmp_path / 'old' / 'chkpt_7.pt'}"]
    assert not (tmp_path / "chkpt").exists()


EMBEDDER_ON_A_FULL_DISK = """
import sys
import tensorboardX
import tensorboardX.event_file_writer as tb
from reverse_voicefilter.commands.embedder_trainer import console

def full(self, event):
    raise OSError(28, "No space left on device")

opened = tensorboardX.SummaryWriter.__init__

def open_then_fill(self, *args, **kwargs):
    opened(self, *args, **kwargs)
    tb.EventsWriter.write_event = full  # the disk fills up after the start (the checkpoints' stays free)

tensorboardX.SummaryWriter.__init__ = open_then_fill
sys.argv = ["embedder_trainer.py", *sys.argv[1:]]
console()
"""


@pytest.mark.slow
def test_a_full_disk_stops_the_embedders_tensorboard_logging_not_its_training(corpus, tmp_path):
    # the embedder's trainer used tensorboardX's writer as it is: its events waited forever for the
    # writing thread a full disk had ended, and so did the exit
    config = write_config(tmp_path / "c.yaml", {"max_steps": 4, "checkpoint_interval": 2, "summary_interval": 1})
    proc = subprocess.run([sys.executable, "-c", EMBEDDER_ON_A_FULL_DISK, "-c", str(config), "-m", "full", "-b",
                           str(tmp_path), "--libri_dir", str(corpus), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("TensorBoard logging stopped") == 1, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "chkpt" / "full" / "chkpt_4.pt")["step"] == 4
    assert (tmp_path / "chkpt" / "full" / "embedder.pt").is_file()
