"""bench.py runs end to end and reports the ratios it promises (the numbers themselves live in the README)."""
import json

import bench


def test_bench_reports_latent_over_token_ratios(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--sizes", "tiny", "--batch", "4", "--context", "8", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    for key in ("token_ms", "coconut_latent_ms", "soft_latent_ms"):
        assert rows[0][key] > 0
    assert rows[0]["soft_latent_over_token"] == rows[0]["soft_latent_ms"] / rows[0]["token_ms"]
