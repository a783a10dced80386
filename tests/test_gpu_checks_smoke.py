"""benchmarks/gpu_checks.py --smoke: the one GPU script runs end to end on the CPU (tiny sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s on a loaded 2-core CPU: 17 items, 3 of them compile (aot_eager)
def test_gpu_checks_smoke_runs_every_item_on_cpu(tmp_path):
    out = tmp_path / "gpu_checks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--smoke", "--threads", "1",
           "--budget-s", "600", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["env"]["torch"] == __import__("torch").__version__
    results = report["results"]
    expected = {"correctness", "adm/baseline", "adm/all", "adm/all_but_compile", "teacher_ode", "delta_e",
                "adm/sdpa", "adm/channels_last", "adm/fused", "adm/teacher_bf16", "fsdp_vs_ddp", "profile",
                "adm/compile", "adm/all_but_compile_batch80", "adm/all_but_compile+cudnn_benchmark",
                "adm/all_reduce_overhead"}
    assert expected <= set(results)
    for name in expected:
        assert "error" not in results[name] and "skipped" not in results[name], (name, results[name])
    c = results["correctness"]
    assert c["attention_ok"] and all(c["loss_curve_ok"].values()), c
    assert c["compile"]["ok"] and c["compile"]["recompiles"] == 0 and c["fsdp_1proc_f32"]["ok"], c
    for name in expected - {"correctness", "teacher_ode", "delta_e", "fsdp_vs_ddp", "profile"}:
        assert results[name]["distiller_steps_per_s"] > 0, name
    assert results["adm/baseline"]["ratio_median"] > 0 and results["flops_per_step"]["2"] > 0
    assert set(results["profile"]["baseline"]["seconds"]) >= {"convolution", "optimiser", "EMA"}
    assert all(v["samples_per_s"] > 0 for k, v in results["teacher_ode"].items() if isinstance(v, dict))
    assert results["delta_e"]["stage_s"]["teacher"] > 0
    text = (tmp_path / "gpu_checks.txt").read_text()
    assert text.startswith("gpu_checks: cpu, torch ") and "FSDP2 / DDP" in text
