"""The whole pipeline on built-in synthetic speech: `make demo`.

The command itself is :mod:`reverse_voicefilter.commands.demo`; this file keeps the original's
``python demo.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.demo import console

if __name__ == "__main__":
    console()
