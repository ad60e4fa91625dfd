"""Generate VoiceFilter training and test mixtures from LibriSpeech (or VoxCeleb).

The command itself is :mod:`reverse_voicefilter.commands.generator`; this file keeps the original's
``python generator.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.generator import console

if __name__ == "__main__":
    console()
