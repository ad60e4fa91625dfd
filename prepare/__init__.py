"""Data preparation: download LibriSpeech (`prepare.librispeech`), loudness-normalize and resample it
(`prepare.normalize`, also behind utils/normalize-resample.sh), or synthesize a small corpus in the same
layout (`prepare.demo_corpus`)."""
