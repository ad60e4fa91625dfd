"""Keep (or remove) the reference speaker's voice in mixtures with a trained VoiceFilter.

The command itself is :mod:`reverse_voicefilter.commands.inference`; this file keeps the original's
``python inference.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.inference import console

if __name__ == "__main__":
    console()
