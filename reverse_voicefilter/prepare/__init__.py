"""Data preparation: download LibriSpeech (``librispeech``), loudness-normalize and resample it
(``normalize``, also behind utils/normalize-resample.sh), or synthesize a small corpus in the same
layout (``demo_corpus``); each runs as ``python -m reverse_voicefilter.prepare.NAME``."""
