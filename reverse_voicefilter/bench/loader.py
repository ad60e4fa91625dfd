"""Training data loading: on-the-fly mixing (``data.mixing: online``) against precomputed files.

Variants (each in a fresh process, the same data and config):

* ``precomputed``  the baseline: the trainer's loader over a folder generator.py wrote
                   beforehand (``.pt`` spectrograms read from disk, d-vectors from the split's cache),
                   no worker processes;
* ``online-w0``    online mixing in the training process (``train.num_workers 0``);
* ``online-w1``    online mixing in one loader worker process;
* ``online-w2``    in two.

Figures per variant: the samples per second the loader delivers, in the form the training step
takes (d-vectors [B, E] and both spectrograms [B, T, F], the online spectrograms computed by
``Audio.wav2spec_torch`` in the training process), over a cold epoch (epoch 0: online mixing
decodes each utterance and embeds each reference the first time it is drawn) and warm (epoch 0
again: every utterance decoded and every reference embedded already, the steady state of a long
run, whose later epochs draw new mixtures of utterances it has seen); then a few training steps at
the config's size (``training.steps.train_step``, Adam) on epoch 2, fed by that loader: seconds per
step and the seconds of each step spent waiting for the loader. Disk: what the variant needs per sample (the generated
folder's size per sample for ``precomputed``; for online, the bytes written under the run's
folders while it ran: the d-vector cache only, per reference, nothing per sample).

Data: ``../shared/data/librispeech-mini`` (``--data``): test-other, 10 speakers x 10 utterances,
FLAC, used as the training speakers (as bench.generator does); without it the synthetic demo
corpus. The embedder is resemblyzer's pretrained encoder (the trainer's default).

Duration on the 2-core development machine: ``--quick`` (config/tiny.yaml) about 2 minutes;
the default size (config/default.yaml, 2 timed steps of about 22 s each per variant) about 10.

    .venv/bin/python -m reverse_voicefilter.bench.loader --quick
    .venv/bin/python -m reverse_voicefilter.bench.loader --threads 1 --json loader.json
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from reverse_voicefilter.bench import common
from reverse_voicefilter.bench.generator import data_flags, prepare_corpus

VARIANTS = {"precomputed": None, "online-w0": 0, "online-w1": 1, "online-w2": 2}  # name: online loader workers


def parse_args():
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config (default config/default.yaml; --quick: config/tiny.yaml)")
    p.add_argument("--data", default=str(common.DEFAULT_DATA), help="LibriSpeech-layout folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="samples per epoch (default 200; --quick: 64)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 2; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first (default 1)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # internal: the parent's scratch folder
    args = common.parse(p)
    args.config = args.config or str(common.PACKAGE / "config" / ("tiny.yaml" if args.quick else "default.yaml"))
    args.samples = args.samples or (64 if args.quick else 200)
    args.steps = args.steps or (3 if args.quick else 2)
    return args


def online_keys(corpus):
    """The data.* keys that make online mixing draw from the speakers the generator used."""
    if corpus["kind"] == "librispeech-mini":
        return {"libri_dir": corpus["dir"], "train_subsets": ["test-other"], "test_subsets": [],
                "input_glob": "*.flac"}
    return {"libri_dir": corpus["dir"], "train_subsets": ["train-clean-100"], "test_subsets": ["dev-clean"]}


def folder_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).exists() else 0


def time_epoch(loader, epoch, batches):
    """``(seconds to the first batch, samples/s after it)`` over ``batches`` batches of ``epoch``."""
    loader.sampler.set_position(epoch)
    start = time.perf_counter()
    stamps = []
    for i, _ in enumerate(loader):
        stamps.append(time.perf_counter())
        if i + 1 == batches:
            break
    rate = (len(stamps) - 1) * loader.loader.batch_size / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return stamps[0] - start, rate


class Wrapped:
    """The precomputed DataLoader with the attributes time_epoch reads of an online one."""

    def __init__(self, loader):
        self.loader, self.sampler = loader, loader.sampler

    def __iter__(self):
        return iter(self.loader)


def build_loader(args, name, hp, device, workdir, run_dir):
    from reverse_voicefilter.data.dataloader import build_dataset, create_dataloader
    from reverse_voicefilter.data.online import create_online_loader
    from reverse_voicefilter.model.embedder import load_embedder

    embedder = load_embedder("resemblyzer", hp, device)
    if VARIANTS[name] is None:
        hp.train.num_workers = 0
        dataset = build_dataset(hp, Path(workdir) / "pre" / "train", embedder, progress=False)  # d-vectors: untimed
        return Wrapped(create_dataloader(hp, dataset, True, device, seed=0))
    corpus = json.loads(Path(workdir, "corpus.json").read_text())
    hp.data.update(mixing="online", epoch_samples=args.samples, **online_keys(corpus))
    hp.train.num_workers = VARIANTS[name]
    return create_online_loader(hp, embedder, run_dir, device, seed=0)


def run_variant(args, name):
    import torch

    from reverse_voicefilter.core.hparams import HParam
    from reverse_voicefilter.model.model import VoiceFilter
    from reverse_voicefilter.training.steps import make_loss, make_optimizer, train_step

    device = common.pick(args.device)
    hp = HParam(args.config)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"run_{name}_", dir=args.workdir) as run_dir:
        loader = build_loader(args, name, hp, device, args.workdir, run_dir)
        batches = loader.sampler.batches_per_epoch
        cold_first, cold = time_epoch(loader, 0, batches)
        warm_first, warm = time_epoch(loader, 0, batches)  # again: utterances decoded, references embedded

        model = VoiceFilter(hp).to(device).train()
        optimizer, loss_fn = make_optimizer(hp, model.parameters()), make_loss(hp)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        loader.sampler.set_position(2)
        it = iter(loader)
        waits, steps = [], []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            batch = next(it)
            fed = time.perf_counter()
            train_step(model, batch, optimizer, scaler, loss_fn, device, "fp32").item()
            common.synchronize(device)
            waits.append(fed - start)
            steps.append(time.perf_counter() - start)
        del it
        written = folder_bytes(run_dir)
    pre_bytes = folder_bytes(Path(args.workdir) / "pre" / "train")
    online = VARIANTS[name] is not None
    return {"workers": VARIANTS[name] or 0, "batch_size": hp.train.batch_size, "samples_per_epoch": args.samples,
            "cold_first_batch_s": cold_first, "cold_samples_per_s": cold, "warm_first_batch_s": warm_first,
            "warm_samples_per_s": warm, "s_per_step": common.median(steps[args.warmup:]),
            "wait_s_per_step": common.median(waits[args.warmup:]),
            "disk_kb_per_sample": 0.0 if online else pre_bytes / 1024 / args.samples,
            "dvec_cache_kb": written / 1024 if online else None, **common.process_stats(device)}


def main():
    args = parse_args()

    def prepare(workdir):
        corpus = prepare_corpus(args, workdir)
        print(f"loader benchmark: {args.config}, {args.samples} samples per epoch from {corpus['kind']}; writing "
              f"the precomputed folder", file=sys.stderr, flush=True)
        common.run_tool([sys.executable, "generator.py", "-c", args.config, "-o", Path(workdir) / "pre",
                         *data_flags(corpus), "--train_size", str(args.samples), "--test_size", "0", "-p", "2",
                         "--progress", "False"])
        return corpus

    common.run_benchmark(__spec__.name, args, run_variant, VARIANTS, "Training data loader",
                         lambda results, corpus, _, __: summarize(args, results, corpus), prepare=prepare,
                         workdir_prefix="bench_loader_", shared_file="corpus.json")


def summarize(args, results, corpus):
    """The table, notes and JSON payload of the results so far."""
    columns = [("samples/s, cold epoch", "cold_samples_per_s"), ("samples/s, warm epoch", "warm_samples_per_s"),
               ("first batch s (cold)", "cold_first_batch_s"), ("train s/step", "s_per_step"),
               ("of which waiting for data", "wait_s_per_step"), ("disk kB/sample", "disk_kb_per_sample"),
               ("d-vector cache kB", "dvec_cache_kb"), ("peak RSS MB", "peak_rss_mb"), ("load (1 min)", "load_1min")]
    ratios = [("warm speed vs precomputed", "warm_samples_per_s", True)]
    notes = [f"Data: {corpus['kind']}; config {Path(args.config).name}; {args.samples} samples per epoch, batch "
             f"{next((r['batch_size'] for r in results.values() if 'batch_size' in r), '?')}; training: median of "
             f"{args.steps} steps after {args.warmup} warm-up, each fed by the variant's loader (epoch 2). Cold: "
             f"epoch 0 (online: every utterance decoded and every reference embedded for the first time); warm: "
             f"epoch 0 again (all cached: a long run's steady state). The precomputed "
             f"folder's d-vectors were cached before timing. Ratios: > 1 is faster than reading precomputed files. "
             f"{os.cpu_count()} CPU cores: loader workers share them with the training step."]
    table = common.markdown_table(results, columns, ratios, baseline="precomputed")
    return table, notes, {"args": vars(args), "corpus": corpus, "results": results}


if __name__ == "__main__":
    main()
