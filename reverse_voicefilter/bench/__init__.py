"""The benchmarks: ``python -m reverse_voicefilter.bench.NAME`` (README.md here)."""
