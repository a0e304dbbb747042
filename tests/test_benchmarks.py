"""The benchmark scripts run at tiny size (their figures are never asserted: benchmarks/RESULTS.md holds them)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_torch_reference_checks_parity_and_prints_ratios():
    out = _run("torch_reference.py", "--d_model=64", "--n_layers=3", "--n_heads=2", "--mlp_hidden=128",
               "--vocab=256", "--text_tokens=8", "--grid=4", "--answer_len=8", "--targets=2", "--layer=1",
               "--batch_size=2", "--repeats=1")
    assert "parity, clean" in out and "parity, decision" in out and "FAILED" not in out
    assert out.count("faster per token than torch SDPA") == 2


@pytest.mark.slow
def test_explain_memory_runs():
    out = _run("explain_memory.py", "--sizes=64x64,200x120")
    assert "200x120" in out and "peak MB" in out


@pytest.mark.slow
def test_explain_benchmark_runs():
    out = _run("explain.py", "--d_model=64", "--n_layers=3", "--n_heads=2", "--mlp_hidden=128", "--vocab=256",
               "--grid=4", "--answer_len=8", "--targets=4", "--repeats=1")
    assert "speedup of one call over one call per token" in out and "noise x4 cost relative to x1" in out
