"""Train VoiceFilter: ``python trainer.py -c CONFIG -e EMBEDDER -m NAME [-b BASE_DIR]``.

Checkpoints go to ``BASE/chkpt/NAME/chkpt_STEP.pt`` (plus ``best.pt`` and the
run's ``config.yaml``), logs and TensorBoard events to ``BASE/logs/NAME``.
``--checkpoint_path chkpt/NAME/chkpt_STEP.pt`` resumes; ``--init_from CKPT``
starts a new run from another run's weights. ``--libri_dir ROOT`` (or
``data.mixing: online``) mixes the training data on the fly from a corpus. Multi-GPU:
``torchrun --nproc_per_node N trainer.py ...``. The procedure lives in
:mod:`reverse_voicefilter.training.train`.
"""
from reverse_voicefilter.core.cli import UserErrorParser, add_bool_flag, add_device_flag, add_threads_flag
from reverse_voicefilter.core.errors import run_cli
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.core.threads import configure as configure_threads


def build_parser():
    parser = UserErrorParser(description="Train the VoiceFilter masking network.")
    parser.add_argument("-c", "--config", required=True, help="yaml file of the configuration")
    parser.add_argument("-e", "--embedder_path", default="resemblyzer",
                        help="speaker embedder: an original-format embedder.pt, or 'resemblyzer' (the default: "
                             "the pretrained GE2E encoder of the resemblyzer package)")
    parser.add_argument("-m", "--model", required=True,
                        help="name of the run, used for its checkpoint and log folders")
    parser.add_argument("-b", "--base_dir", default=".", help="root folder of chkpt/ and logs/ (default: .)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--checkpoint_path", default=None, help="checkpoint to resume from")
    start.add_argument("--init_from", default=None, metavar="CKPT",
                       help="start a new run from this checkpoint's weights only (fine-tuning): new optimizer, "
                            "step 0, no best score")
    add_bool_flag(parser, "--overwrite",
                  help="start over in a run folder that already holds checkpoints: deletes that run's "
                       "chkpt_*.pt and best.pt (without it such a run is refused)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop at this step (overrides train.max_steps; 0: until interrupted)")
    parser.add_argument("--train_dir", default=None, help="training samples (overrides data.train_dir)")
    parser.add_argument("--test_dir", default=None, help="test samples (overrides data.test_dir)")
    parser.add_argument("--libri_dir", default=None,
                        help="mix the training data on the fly from this LibriSpeech root (sets data.libri_dir "
                             "and data.mixing online): no generator run, nothing written per sample")
    parser.add_argument("--voxceleb_dir", default=None,
                        help="the same from a VoxCeleb root (sets data.voxceleb_dir and data.mixing online)")
    add_bool_flag(parser, "--reverse_data", default=None,
                  help="online mixing: the interfering voice is the target, the reverse task (overrides "
                       "data.reverse_data)")
    add_device_flag(parser)
    add_threads_flag(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)  # before torch loads: its OpenMP reads the wait policy then
    hp = HParam(args.config)
    if args.max_steps is not None:
        hp.train.max_steps = args.max_steps
    if args.train_dir is not None:
        hp.data.train_dir = args.train_dir
    if args.test_dir is not None:
        hp.data.test_dir = args.test_dir
    for key in ("libri_dir", "voxceleb_dir"):
        if getattr(args, key) is not None:
            hp.data[key], hp.data.mixing = getattr(args, key), "online"
    if args.reverse_data is not None:
        hp.data.reverse_data = args.reverse_data

    from reverse_voicefilter.training.train import run_training
    return run_training(hp, args.model, base_dir=args.base_dir, embedder=args.embedder_path,
                        checkpoint_path=args.checkpoint_path, init_from=args.init_from, overwrite=args.overwrite,
                        threads=args.threads, device=args.device)


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
