"""Train VoiceFilter: ``python trainer.py -c CONFIG -e EMBEDDER -m NAME [-b BASE_DIR]``.

The command itself is :mod:`reverse_voicefilter.commands.trainer`; this file keeps the original's
``python trainer.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.trainer import console

if __name__ == "__main__":
    console()
