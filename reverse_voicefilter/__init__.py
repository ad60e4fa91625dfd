"""Reverse VoiceFilter: speaker-conditioned speech separation, and its reverse (remove one known
speaker, keep the rest).

The layers, from the ground up; a module imports only from its own layer and those below it
(tests/test_layout.py checks): ``core`` (audio, config, checkpoints, files, command-line
helpers) < ``model`` < ``data`` (corpora, mixing, loaders) < ``separation`` < ``evaluation``
(scoring) < ``training`` < ``commands`` (the scripts' main functions); ``embedding`` (GE2E
speaker encoder training) and ``prepare`` (LibriSpeech download, normalization, the demo corpus)
stand beside them, ``bench`` on top.
"""
