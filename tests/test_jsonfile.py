"""The one JSON writer of the reports: NaN and infinities become null, so every reader takes the file."""
import json
import math

import pytest

from reverse_voicefilter.core.jsonfile import json_text, write_json


def strict_load(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null(tmp_path):
    report = {"median": math.nan, "rows": [1.5, math.inf, (-math.inf, 2)], "nested": {"x": float("nan")}, "n": 3}
    path = write_json(tmp_path / "r.json", report)
    assert strict_load(path.read_text()) == {"median": None, "rows": [1.5, None, [None, 2]], "nested": {"x": None},
                                             "n": 3}


def test_python_json_alone_would_write_nan():
    with pytest.raises(ValueError):  # what the benchmarks' quality.json held before: NaN, not JSON
        strict_load(json.dumps({"median": math.nan}))
    assert strict_load(json_text({"median": math.nan})) == {"median": None}
