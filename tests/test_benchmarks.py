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
    "data_plan": ["--rows", "100000", "--locate", "1000"],
    "preprocess_text": ["--docs", "200"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), *SMOKE[name]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
