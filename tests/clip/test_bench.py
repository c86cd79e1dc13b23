"""bench/clip.py runs end to end on a tiny batch and reports both throughputs and their ratios."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "clip.py"


def test_clip_speed_bench_reports_train_and_encode_ratios(tmp_path):
    out = tmp_path / "clip.json"
    subprocess.run([sys.executable, str(BENCH), "--batch-size", "4", "--repeats", "1", "--iterations", "1", "--out",
                    str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    for kind in ("train", "encode"):
        speeds = results[f"{kind}_images_per_s"]
        assert speeds["mmgen"] > 0 and speeds["open_clip"] > 0
        assert abs(results[f"{kind}_ratio"] - speeds["mmgen"] / speeds["open_clip"]) < 1e-9
    assert results["model"] == "shapes" and results["batch_size"] == 4


def test_clip_speed_bench_rejects_a_bad_batch_size():
    result = subprocess.run([sys.executable, str(BENCH), "--batch-size", "1"], capture_output=True, text=True)
    assert result.returncode != 0 and "--batch-size must be >= 2" in result.stderr
