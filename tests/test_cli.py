import json

import numpy as np
from typer.testing import CliRunner

from turbovq.cli import app

runner = CliRunner()


def test_demo_writes_plot_and_table(tmp_path):
    out = tmp_path / "demo.png"
    result = runner.invoke(app, ["demo", "--n", "3000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "IP slope" in result.output and out.stat().st_size > 10_000
    report = json.loads(runner.invoke(app, ["demo", "--n", "3000", "--out", str(out), "--json"]).output)
    rows = report["distortion"]
    assert [r["bits"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["lower"] < r["d_mse"] < r["upper"]
        assert abs(r["ip_slope_prod"] - 1) < 0.05
    search = {(r["method"], r["bits"]): r for r in report["search"]}
    for bits in (2, 4):  # learning the spectrum pays; more bits find more true neighbours
        assert search["turbovq default", bits]["recall_1_at_1"] > search["paper (oblivious)", bits]["recall_1_at_1"]
    assert search["turbovq default", 4]["recall_1_at_1"] > search["turbovq default", 2]["recall_1_at_1"]


def test_distortion_json():
    result = runner.invoke(app, ["distortion", "--dim", "128", "--max-bits", "4", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)["rows"]
    assert abs(rows[3]["d_mse"] - 0.009315) < 1e-5


def test_quantize_dequantize_info_round_trip(tmp_path):
    x = np.random.default_rng(0).standard_normal((500, 96)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = runner.invoke(
        app, ["quantize", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.tvq"), "--bits", "3.5", "--calibrate"]
    )
    assert r.exit_code == 0, r.output
    assert "bits/coordinate" in r.output
    r = runner.invoke(app, ["dequantize", str(tmp_path / "x.tvq"), "-o", str(tmp_path / "y.npy")])
    assert r.exit_code == 0, r.output
    y = np.load(tmp_path / "y.npy")
    assert y.shape == x.shape and np.mean((x - y) ** 2) / np.mean(x**2) < 0.05
    assert "n=500" in runner.invoke(app, ["info", str(tmp_path / "x.tvq")]).output


def test_clear_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.full((4, 8), np.nan, dtype=np.float32))
    r = runner.invoke(app, ["quantize", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "o.tvq")])
    assert r.exit_code == 2 and "NaN" in r.output
    (tmp_path / "junk.tvq").write_bytes(b"hello")
    r = runner.invoke(app, ["info", str(tmp_path / "junk.tvq")])
    assert r.exit_code == 2 and "not a turbovq file" in r.output
    r = runner.invoke(app, ["quantize", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "o.tvq")])
    assert r.exit_code != 0 and "does not exist" in r.output
