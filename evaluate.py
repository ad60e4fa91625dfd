"""Score a trained VoiceFilter on a generator test folder: SDR, SI-SDR and speaker similarity.

The command itself is :mod:`reverse_voicefilter.commands.evaluate`; this file keeps the original's
``python evaluate.py ...`` working from the repository's root."""
from reverse_voicefilter.commands.evaluate import console

if __name__ == "__main__":
    console()
