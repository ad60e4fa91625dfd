"""Moved to :mod:`datasets.dvec_cache` (with the data it serves); kept importable here for the
modules that still import it from utils."""
from datasets.dvec_cache import cache_path, load_dvecs, read_cache, reference_key, resolve_reference, write_cache

__all__ = ["cache_path", "load_dvecs", "read_cache", "reference_key", "resolve_reference", "write_cache"]
