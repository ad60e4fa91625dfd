import pytest
import yaml

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import DEFAULT_CONFIG, HParam, load_hparam


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_originals():
    hp = HParam()
    assert (hp.audio.n_fft, hp.audio.num_freq, hp.audio.hop_length, hp.audio.win_length) == (1200, 601, 160, 400)
    assert (hp.model.lstm_dim, hp.model.fc1_dim, hp.model.fc2_dim) == (400, 600, 601)
    assert hp.form.target.wav == "*-target.wav" and hp.form.mixed.mag == "*-mixed.pt"
    assert hp.train.adabound.final == 0.05 and hp.train.checkpoint_interval == 1000
    assert hp.embedder.lstm_hidden == 768 and hp.embedder.window == 80
    assert hp.log.chkpt_dir == "chkpt"


def test_partial_user_config_takes_defaults(tmp_path):
    hp = HParam(write(tmp_path, "train:\n  batch_size: 2\n---\nmodel:\n  lstm_dim: 32\n"))
    assert hp.train.batch_size == 2 and hp.model.lstm_dim == 32
    assert hp.train.adam == 0.001 and hp.audio.n_fft == 1200


def test_original_style_multi_document_file_loads(parity_dir):
    hp = load_hparam(parity_dir / "config.yaml")
    assert hp.model.lstm_dim == 32 and hp.embedder.lstm_hidden == 64 and hp.train.checkpoint_interval == 3


@pytest.mark.parametrize("text, key", [
    ("train:\n  batch_sise: 2\n", "train.batch_sise"),
    ("trian:\n  batch_size: 2\n", "trian"),
    ("train:\n  adabound:\n    finl: 0.1\n", "train.adabound.finl"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, text, key):
    with pytest.raises(UserError, match=f"unknown key '{key}'"):
        HParam(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("train:\n  batch_size: eight\n", "train.batch_size"),
    ("train:\n  batch_size: 8.5\n", "train.batch_size"),
    ("train:\n  channels_last: 1\n", "train.channels_last"),
    ("data:\n  train_dir: 3\n", "data.train_dir"),
    ("train:\n  adabound: 0.1\n", "train.adabound"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        HParam(write(tmp_path, text))


def test_int_is_accepted_for_a_float_key(tmp_path):
    hp = HParam(write(tmp_path, "train:\n  adam: 1\n"))
    assert hp.train.adam == 1.0 and isinstance(hp.train.adam, float)


def test_derived_sizes_are_checked(tmp_path):
    with pytest.raises(UserError, match="num_freq"):
        HParam(write(tmp_path, "audio:\n  n_fft: 512\n"))
    with pytest.raises(UserError, match="fc2_dim"):
        HParam(write(tmp_path, "audio:\n  n_fft: 512\n  num_freq: 257\n"))


def test_bad_choices_and_files(tmp_path):
    with pytest.raises(UserError, match="train.optimizer"):
        HParam(write(tmp_path, "train:\n  optimizer: sgd\n"))
    with pytest.raises(UserError, match="not found"):
        HParam(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        HParam(write(tmp_path, "train: [unclosed\n"))


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(UserError):
        HParam(write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n"))


def test_hp_str_round_trips_and_is_multi_document(tmp_path):
    hp = HParam(write(tmp_path, "model:\n  lstm_dim: 32\n"))
    docs = [d for d in yaml.safe_load_all(hp.hp_str) if d]
    assert [list(d)[0] for d in docs] == ["audio", "model", "data", "form", "train", "log", "embedder"]
    assert HParam.from_string(hp.hp_str) == hp


def test_every_new_key_is_commented_in_default_config():
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if "new:" in line:
            assert "#" in line
    keys = [ln.split(":")[0].strip() for ln in DEFAULT_CONFIG.read_text().splitlines() if "# new" in ln]
    assert {"conv_channels", "max_steps", "loss", "precision", "seed"} <= set(keys)
