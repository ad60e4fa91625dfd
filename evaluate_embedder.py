"""Score a speaker embedder by equal error rate:

The command itself is :mod:`reverse_voicefilter.commands.evaluate_embedder`; this file keeps the original's
``python evaluate_embedder.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.evaluate_embedder import console

if __name__ == "__main__":
    console()
