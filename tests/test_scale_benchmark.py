"""A small version of benchmarks/scale.py (the full one writes 2.7 GB and runs for minutes): its JSON output has
the documented keys, the sizes it was asked for, measured peaks and a LASSO that recovers the planted weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.ray
def test_scale_benchmark_json_on_a_small_size(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "--sizes", "384x256", "--dir", str(tmp_path)],
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600).stdout
    [row] = json.loads(out.strip().splitlines()[-1])
    for key in ("models", "targets", "n_train", "logits_bytes", "driver_peak_rss_bytes", "unit_peak_rss_bytes",
                "seconds"):
        assert key in row
    assert (row["models"], row["targets"]) == (384, 256)
    assert row["logits_bytes"] == 384 * 256 * 10 * 4
    assert row["driver_peak_rss_bytes"] > 0 and row["unit_peak_rss_bytes"] > 0
    assert row["units"] >= 2  # a Gram unit and the LASSO target chunks, measured inside the Ray workers
    assert row["recovery_error"] < 0.3  # 128 fit models, 5 true weights per target out of 100 points
