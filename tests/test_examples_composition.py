"""The semi-supervised, conditional and global-latent example scripts run end to end with tiny arguments."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--device", "cpu", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_ss_vae_example(tmp_path):
    out, plot = tmp_path / "ss.json", tmp_path / "ss.png"
    stdout = run_example("ss_vae.py", "--epochs", "1", "--hidden", "16", "--baseline-steps", "5",
                         "--out", str(out), "--plot", str(plot))
    result = json.loads(out.read_text())
    assert result["finished"] and result["epochs_run"] == 1 and result["num_labelled"] == 100
    assert 0.0 <= result["test_accuracy"] <= 1.0 and 0.0 <= result["baseline_test_accuracy"] <= 1.0
    assert {"torch", "pyro", "device", "date"} <= set(result)
    assert plot.stat().st_size > 0 and "test accuracy" in stdout


def test_cvae_example(tmp_path):
    out, plot = tmp_path / "cvae.json", tmp_path / "cvae.png"
    stdout = run_example("cvae.py", "--epochs", "1", "--hidden", "16", "--completions", "3",
                         "--out", str(out), "--plot", str(plot))
    result = json.loads(out.read_text())
    assert math.isfinite(result["test_neg_elbo_per_point"]) and 0 < result["rmse_mean_completion"] < 1
    assert plot.stat().st_size > 0 and "completion" in stdout


def test_global_latent_example(tmp_path):
    out = tmp_path / "global.json"
    stdout = run_example("global_latent.py", "--epochs", "1", "--hidden", "16", "--num-samples", "4",
                         "--out", str(out))
    result = json.loads(out.read_text())
    assert result["sigma_posterior_mean"] > 0 and result["sigma_posterior_sd"] >= 0
    # do(sigma = 0.3): 180 x 64 draws scatter around the decoder's mean with sd 0.3
    # (se about 0.3 / sqrt(2 * 11520) = 0.002; a 0.03 tolerance does not fail by chance).
    assert abs(result["do_sigma_0.3_spread"] - 0.3) < 0.03
    assert "condition(sigma=0.05): site observed = True" in stdout
