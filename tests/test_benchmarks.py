"""Every benchmark script still runs: GPU ones with their tiny CPU shape, CPU ones small.
No timing is asserted; figures belong in benchmarks/NOTES.md."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = {
    "generate_throughput": ["--tiny"],
    "codec_throughput": ["--tiny", "--clips", "2", "--seconds", "1"],
    "profile_step": ["--tiny", "--steps", "1", "--accumulate", "2"],
    "build_shards": ["--clips", "8"],
    "checkpoint_hash": ["--tiny"],
    "fp8_ab": ["--tiny", "--out", "."],  # emulated FP8 on CPU
    "memory_7b": ["--tiny", "--device", "cpu", "--json", "memory_7b.json"],
    "liger_ab": ["--tiny", "--device", "cpu", "--json", "liger_ab.json"],  # ours vs eager; liger needs CUDA
    "codec_overhead": ["--tiny", "--rounds", "1"],
    "dpo_step": ["--tiny", "--steps", "1"],
    "data_plan": ["--rows", "100000", "--locate", "1000"],
    "preprocess_text": ["--docs", "200"],
    # GPU-only measurements: on CPU they say so and exit 0 (their imports stay checked)
    "attention_kernels": [],
    "host_overhead": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), *SMOKE[name]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_profile_breakdown_counts_idle_from_device_work_only():
    """profile_step's GPU accounting on a hand-made trace: annotation spans on the GPU timeline
    (named like CPU ranges) are not busy time, gaps go to the phase the CPU was in, and device
    work linked to no CPU op is reported."""
    import sys
    from types import SimpleNamespace as N

    from torch.autograd import DeviceType
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step as ps

    def ev(name, dev, start, end, parent=None, kernels=()):
        return N(name=name, device_type=dev, time_range=N(start=start, end=end), cpu_parent=parent,
                 kernels=list(kernels), cpu_children=[], sequence_nr=-1, cpu_time_total=end - start)
    fwd = ev("ualm.forward", DeviceType.CPU, 0, 100)
    opt = ev("ualm.optimizer", DeviceType.CPU, 100, 200)
    mm = ev("aten::mm", DeviceType.CPU, 1, 5, fwd, [N(name="gemm", duration=30)])
    sync = ev("aten::item", DeviceType.CPU, 35, 65, fwd)
    events = [fwd, opt, mm, sync, ev("ualm.forward", DeviceType.CUDA, 0, 100),  # an annotation span
              ev("gemm", DeviceType.CUDA, 0, 30), ev("stray", DeviceType.CUDA, 60, 70),
              ev("adam", DeviceType.CUDA, 150, 160)]
    b = ps.breakdown(N(events=lambda: events, key_averages=lambda: []), steps=1)
    assert b["gpu_busy_ms_per_step"] == 30e-3 + 10e-3 + 10e-3
    assert b["idle_ms_per_step"] == (30 + 80) * 1e-3
    assert b["idle_ms_per_step_by_phase"] == {"ualm.optimizer": 80e-3, "ualm.forward": 30e-3}
    assert b["largest_gaps"][1]["cpu_ops"] == "aten::item < ualm.forward"
    assert [e["name"] for e in b["unlinked_device_events"]] == ["stray", "adam"]
    # CPU time inside each ualm.* range (the CPU events only; the GPU annotation span is not one)
    assert {k: v["ms"] for k, v in b["cpu_ms_per_step_by_scope"].items()} == {"ualm.forward": 0.1, "ualm.optimizer": 0.1}
