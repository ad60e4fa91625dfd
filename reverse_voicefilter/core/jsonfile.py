"""JSON reports: one writer for every report file, so that a NaN or an infinity (an SDR of a
silent sample, a metric with nothing to average) is written as null, which JSON has, rather than
as NaN, which it has not (Python's json writes it, other readers refuse the file)."""
import json
import math

from reverse_voicefilter.core.atomic import write_text


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj, indent=1, **kwargs):
    """Strict JSON text of ``obj`` (non-finite floats as null), ending in a newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **kwargs) + "\n"


def write_json(path, obj, indent=1, **kwargs):
    """Write ``obj`` to ``path`` as strict JSON, atomically; returns the path."""
    return write_text(path, json_text(obj, indent=indent, **kwargs))
