"""Train a speaker embedder with the GE2E loss:
``python embedder_trainer.py -c CONFIG -m NAME [-b BASE_DIR] [--checkpoint_path CKPT]``.

The ``ge2e`` section of the config says where the speakers are and how to train
(config/ge2e-*.yaml); the ``embedder`` section sizes the network. Checkpoints, the
embedder file ``embedder.pt`` (pass it to trainer.py, inference.py, evaluate.py and
evaluate_embedder.py with ``-e``) and the run's config go to ``BASE/chkpt/NAME/``,
TensorBoard events to ``BASE/logs/NAME``. Rerunning a finished run is refused: add
``--checkpoint_path`` to continue it or ``--overwrite`` to start over. One run at a time
in a run folder (a second is refused while the first lives). The procedure lives in
:mod:`reverse_voicefilter.embedding.train`.
"""
import logging

from reverse_voicefilter.core.cli import (
    UserErrorParser,
    add_bool_flag,
    add_device_flag,
    add_threads_flag,
    apply_threads,
    setup_console_logging,
)
from reverse_voicefilter.core.errors import UserError, run_cli
from reverse_voicefilter.core.threads import configure as configure_threads


def build_parser():
    parser = UserErrorParser(description="Train a GE2E speaker embedder (the d-vector network behind -e).")
    parser.add_argument("-c", "--config", required=True, help="yaml file of the configuration (its ge2e section)")
    parser.add_argument("-m", "--model", required=True, help="name of the run, used for its checkpoint and log folders")
    parser.add_argument("-b", "--base_dir", default=".", help="root folder of chkpt/ and logs/ (default: .)")
    parser.add_argument("--checkpoint_path", default=None, help="a chkpt_STEP.pt of this run to resume from")
    add_bool_flag(parser, "--overwrite",
                  help="start over in a run folder that already holds checkpoints: deletes that run's "
                       "chkpt_*.pt and embedder.pt (without it such a run is refused)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop at this step (overrides ge2e.max_steps; 0: until interrupted)")
    parser.add_argument("--libri_dir", default=None, help="LibriSpeech root (overrides ge2e.libri_dir)")
    parser.add_argument("--vox_dir", default=None,
                        help="a folder of VoxCeleb speaker folders (overrides ge2e.vox_dir; with --libri_dir: both)")
    add_device_flag(parser)
    add_threads_flag(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)  # before torch loads: its OpenMP reads the wait policy then
    setup_console_logging()
    from reverse_voicefilter.embedding.config import load_ge2e_config  # yaml and utils only: no torch yet

    hp = load_ge2e_config(args.config)
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise UserError("--max_steps must be 0 or more")
        hp.ge2e.max_steps = args.max_steps
    if args.libri_dir is not None:
        hp.ge2e.libri_dir = args.libri_dir
    if args.vox_dir is not None:
        hp.ge2e.vox_dir = args.vox_dir
    apply_threads(args.threads, logging.getLogger("embedder_trainer"))

    from reverse_voicefilter.embedding.train import run_training  # torch and friends: after the flags are checked
    return run_training(hp, args.model, base_dir=args.base_dir, checkpoint_path=args.checkpoint_path,
                        overwrite=args.overwrite, device=args.device)


def console():
    """The command line's entry point (the root script and the installed command)."""
    run_cli(main)


if __name__ == "__main__":
    console()
