"""bench/gpu: the payload prepare.py makes (sizes, budget, refusal) and the run script's stages."""
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from reverse_voicefilter.bench import inference as bench_inference
from reverse_voicefilter.bench import train as bench_train
from reverse_voicefilter.bench.gpu import prepare, run
from reverse_voicefilter.core.errors import run_cli

ROOT = Path(__file__).resolve().parent.parent

PY = sys.executable
MIB = 1 << 20


def _fake_mini(root, train_sizes, test_speakers=("700", "800")):
    """A librispeech-mini of opaque files (prepare copies bytes): ``train_sizes`` {speaker: bytes}."""
    for speaker, size in train_sizes.items():
        path = root / "train-clean-100" / speaker / "1" / f"{speaker}-1-0000.flac"
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes([int(speaker) % 251]) * size)
    for speaker in test_speakers:
        for k in range(2):
            path = root / "test-other" / speaker / "2" / f"{speaker}-2-000{k}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"t" * 1000)
    (root / "LICENSE.TXT").write_text("CC BY 4.0\n")
    return root


def _fake_wheels(folder, skip=()):
    folder.mkdir()
    for name, version in prepare.read_pins():
        if name not in skip:
            (folder / f"{name}-{version}-py3-none-any.whl").write_bytes(b"w" * 100)
    return folder


def _prepare(*argv):
    return subprocess.run([PY, "-m", "reverse_voicefilter.bench.gpu.prepare", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_wheel_list_pins_the_versions_of_requirements():
    pins = dict(prepare.read_pins())
    assert len(pins) == len(prepare.read_pins())  # one version of each
    required = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            required[prepare._normal(name)] = version
    for name, version in pins.items():
        assert required.get(prepare._normal(name), version) == version, name
    for needed in ("librosa", "soundfile", "soxr", "tensorboardX", "mir_eval", "Resemblyzer"):
        assert needed in pins


def test_prepare_fills_the_budget_with_the_first_speakers_by_id(tmp_path):
    sizes = {"19": 3000, "103": 5000, "1001": 7000, "250": 4000}  # by id: 19, 103, 250, 1001
    mini = _fake_mini(tmp_path / "mini", sizes)
    wheels = _fake_wheels(tmp_path / "wheels")
    fixed = prepare.repo_bytes() + 100 * len(prepare.read_pins()) + 4 * 1000 + len("CC BY 4.0\n")
    budget = fixed + 3000 + 5000 + 3999  # 19 and 103 fit, 250 (4000) misses by one byte
    done = _prepare("--data", mini, "--payload", tmp_path / "payload", "--wheels_from", wheels,
                    "--budget_mib", budget / MIB, "--margin_mib", 0, "--min_speakers", 2)
    assert done.returncode == 0, done.stderr
    payload = tmp_path / "payload"
    manifest = json.loads((payload / "manifest.json").read_text())
    assert manifest["train_speakers"] == ["19", "103"]
    assert manifest["train_speakers_total"] == 4
    assert manifest["total_bytes"] == fixed + 8000 <= budget
    assert sorted(p.name for p in (payload / "librispeech-mini" / "train-clean-100").iterdir()) == ["103", "19"]
    copied = payload / "librispeech-mini" / "test-other" / "700" / "2" / "700-2-0001.flac"
    assert copied.read_bytes() == (mini / "test-other" / "700" / "2" / "700-2-0001.flac").read_bytes()
    assert len(list((payload / "wheels").glob("*.whl"))) == len(prepare.read_pins())
    # what was measured is what is there (the manifest itself aside)
    there = prepare.tree_bytes(payload) - (payload / "manifest.json").stat().st_size
    assert manifest["total_bytes"] == manifest["repository_bytes"] + there
    assert f"total that travels: {fixed / MIB + 8000 / MIB:.1f} MiB" in done.stdout
    assert "2 of 4 speakers" in done.stdout


def test_prepare_refuses_a_payload_over_the_budget_and_keeps_the_old_one(tmp_path):
    mini = _fake_mini(tmp_path / "mini", {"19": 3000})
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "manifest.json").write_text("{}")
    done = _prepare("--data", mini, "--payload", payload, "--no_download", "--budget_mib", 1)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the payload does not fit the 1 MiB"), done.stderr
    assert "repository" in lines[0] and "where 0 speakers fit, fewer than the 90 bench.quality needs" in lines[0]
    assert (payload / "manifest.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-made payload left


def test_prepare_refuses_a_missing_wheel_in_one_line(tmp_path):
    mini = _fake_mini(tmp_path / "mini", {"19": 3000})
    wheels = _fake_wheels(tmp_path / "wheels", skip=("soxr",))
    done = _prepare("--data", mini, "--payload", tmp_path / "payload", "--wheels_from", wheels)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {wheels} must hold one wheel of soxr==1.1.0, found 0"]
    assert not (tmp_path / "payload").exists()


def test_prepare_refuses_fewer_speakers_than_bench_quality_needs(tmp_path):
    mini = _fake_mini(tmp_path / "mini", {"19": 3000, "103": 5000, "250": 4000})
    budget = (prepare.repo_bytes() + 4 * 1000 + 10 + 8000 + 2000) / MIB  # 19 and 103 fit, not 250
    done = _prepare("--data", mini, "--payload", tmp_path / "payload", "--no_download", "--budget_mib", budget,
                    "--margin_mib", 0, "--min_speakers", 3)
    assert done.returncode == 2
    assert "where 2 speakers fit, fewer than the 3 bench.quality needs (--min_speakers)" in done.stderr
    assert not (tmp_path / "payload").exists()
    fine = _prepare("--data", mini, "--payload", tmp_path / "payload", "--no_download", "--budget_mib", budget,
                    "--margin_mib", 0, "--min_speakers", 2)
    assert fine.returncode == 0, fine.stderr


def test_prepare_without_librispeech_is_one_line(tmp_path):
    done = _prepare("--data", tmp_path / "nowhere", "--payload", tmp_path / "payload", "--no_download")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'nowhere'} must hold train-clean-100 "
                                                f"and test-other (librispeech-mini)"]


# ---- run.py ------------------------------------------------------------------------------------
def _args(tmp_path, *extra):
    return run.parse_args([str(tmp_path / "out"), "--payload", str(tmp_path / "payload"), *extra])


def test_gpu_stages_run_the_cuda_variants_and_write_into_the_output_folder(tmp_path):
    args = _args(tmp_path)
    out = tmp_path / "out"
    train, inference = run.bench_stages(args, out)
    assert train.cmd[train.cmd.index("--variants") + 1:train.cmd.index("--json")] == run.TRAIN_VARIANTS
    assert {"fp16", "bf16-cl-cudnn", "bf16-cl-compile"} <= set(run.TRAIN_VARIANTS)
    for stage in (train, inference):
        assert stage.cmd[stage.cmd.index("--device") + 1] == "cuda"
        assert stage.cmd[stage.cmd.index("--json") + 1] == str(out / stage.result)
    assert inference.cmd[inference.cmd.index("--data") + 1] == str(tmp_path / "payload" / "librispeech-mini")
    # every stage at its limit fits the run's time, the quality stage with at least 6 of its minutes
    assert sum(run.LIMITS.values()) + args.quality_minutes * 60 < args.stop_minutes * 60 < 600
    assert args.quality_minutes >= 6


def test_quality_stage_trains_for_its_minutes_less_the_reserve_with_loader_workers(tmp_path):
    args = _args(tmp_path, "--jobs", "14")
    stage = run.quality_stage(args, tmp_path / "out")
    cmd = stage.cmd
    assert cmd[cmd.index("--minutes") + 1] == "4.7"  # (360 - 75) / 60, down to a tenth
    assert cmd[cmd.index("--size") + 1] == "default" and cmd[cmd.index("--precision") + 1] == "bf16"
    assert cmd[cmd.index("--batch_size") + 1] == "32" and cmd[cmd.index("--workers") + 1] == "14"
    assert stage.limit_s == 360
    quick = run.quality_stage(_args(tmp_path, "--device", "cpu", "--quick"), tmp_path / "out")
    assert "--quick" in quick.cmd and "--minutes" not in quick.cmd


def test_the_quality_stage_runs_first_after_the_install(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(run, "run_stage", lambda stage, log, env: order.append(stage.name) or (0, 0.0, False))
    run_cli_exit = pytest.raises(SystemExit)
    with run_cli_exit:
        run_cli(run.main, [str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--payload", str(tmp_path)])
    assert order == ["install", "quality", "train", "inference"]


def test_a_stage_over_its_limit_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child-alive"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
            f"print('started', flush=True); time.sleep(60)")
    stage = run.Stage("slow", [PY, "-c", code], limit_s=1.5)
    with open(tmp_path / "run.log", "w") as log:
        start = time.monotonic()
        exit_code, seconds, timed_out = run.run_stage(stage, log, {})
    assert timed_out and exit_code != 0 and time.monotonic() - start < 10
    time.sleep(3)
    assert not marker.exists()  # the stage's child went with it
    text = (tmp_path / "run.log").read_text()
    assert "started" in text and "slow: timed out" in text


def test_a_failing_stage_is_logged_and_the_next_one_still_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(run, "install_stage", lambda args, out: run.Stage("install", [PY, "-c", "exit(3)"], 10))
    monkeypatch.setattr(run, "bench_stages", lambda args, out: [
        run.Stage("train", [PY, "-c", f"open({str(out / 'train.json')!r}, 'w').write('{{}}')"], 10, "train.json")])
    monkeypatch.setattr(run, "quality_stage", lambda args, out: run.Stage("quality", [PY, "-c", "pass"], 10,
                                                                         "quality.json"))
    out.mkdir()
    (out / "quality.json").write_text("an earlier run's")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run.main, [str(out), "--work", str(tmp_path / "work"), "--payload", str(tmp_path)])
    assert exit_info.value.code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["exit"], s["result_written"]) for s in summary["stages"]] == [
        ("install", 3, False), ("quality", 0, False), ("train", 0, True)]
    assert "failed: install" in (out / "run.log").read_text()


def _tiny_wheel(folder):
    """A pure-python wheel of a package ``gpu_payload_probe``."""
    folder.mkdir()
    path = folder / "gpu_payload_probe-1.0-py3-none-any.whl"
    info = "gpu_payload_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("gpu_payload_probe/__init__.py", "VALUE = 42\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_payload_probe\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return folder


def test_install_stage_installs_the_wheels_offline_and_checks_the_imports(tmp_path):
    wheels = _tiny_wheel(tmp_path / "wheels")
    done = subprocess.run([PY, "-m", "reverse_voicefilter.bench.gpu.install", "--wheels", str(wheels),
                           "--site", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "gpu_payload_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert "install: 1 wheels into" in done.stdout and "resemblyzer weights" in done.stdout


@pytest.mark.slow
def test_cpu_quick_run_writes_every_stage_result(tmp_path, libri_mini):
    """The whole chain on the CPU: prepare (no download, the fewest training speakers it allows), then
    every stage at its --quick size reading the payload."""
    payload = tmp_path / "payload"
    done = _prepare("--data", libri_mini, "--payload", payload, "--no_download", "--max_speakers", prepare.MIN_SPEAKERS)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run([PY, "-m", "reverse_voicefilter.bench.gpu.run", str(out), "--device", "cpu", "--quick",
                           "--no_install", "--payload", str(payload), "--work", str(tmp_path / "work"), "--jobs", "1"],
                          capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["install", "quality", "train", "inference"]
    assert all(s["exit"] == 0 for s in summary["stages"])
    for name in ("run.log", "train.json", "inference.json", "quality.json", "quality_curve.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.iterdir())) <= 8  # a transfer back from a remote GPU machine may be limited to 8 files
    print(f"cpu --quick run: {took:.0f} s; stages: "
          + ", ".join(f"{s['name']} {s['seconds']} s" for s in summary["stages"]))


def test_the_run_asks_for_variants_the_benchmarks_have():
    assert set(run.TRAIN_VARIANTS) <= set(bench_train.VARIANTS)
    assert set(run.INFERENCE_VARIANTS) <= set(bench_inference.VARIANTS)
    assert {"fp16", "bf16-cl-cudnn", "bf16-cl-compile"} <= bench_train.CUDA_ONLY  # not offered on a CPU


def test_the_cudnn_benchmark_variant_trains(tmp_path):
    """The variant's own code (cudnn.benchmark set) runs a step; on a CPU, cuDNN is not used."""
    done = subprocess.run([PY, "-m", "reverse_voicefilter.bench.train", "--variant", "bf16-cl-cudnn", "--quick",
                           "--device", "cpu", "--steps", "1", "--warmup", "0"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("BENCH_RESULT ", 1)[1].splitlines()[0])
    assert result["precision"] == "bf16" and result["channels_last"] and result["s_per_step"] > 0
