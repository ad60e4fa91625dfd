"""The commands' main functions: the scripts at the repository's root (generator.py, trainer.py,
inference.py, ...) and the installed console commands call them."""
