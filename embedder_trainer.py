"""Train a speaker embedder with the GE2E loss:

The command itself is :mod:`reverse_voicefilter.commands.embedder_trainer`; this file keeps the original's
``python embedder_trainer.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.embedder_trainer import console

if __name__ == "__main__":
    console()
