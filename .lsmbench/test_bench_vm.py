import os, subprocess, sys
import pytest
from pathlib import Path

@pytest.mark.timeout(1400)
def test_http_bench_in_vm():
    out = Path(os.environ["SOCKPOL_VERIFIER_REPORT"]).parent / "lsm-bench.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "bench" / "http_bench.py"), "--configs", "none,floor,sockpol,lsm",
         "--sizes", "10", "--duration", "6", "--rounds", "3", "--port", "18380", "--out", str(out)],
        capture_output=True, text=True, timeout=1500,
    )
    (out.parent / "lsm-bench.txt").write_text(proc.stdout + "\n----\n" + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert False, proc.stdout
