"""The examples a new user runs first print a verdict, not just numbers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_checks_its_output_against_the_documented_tolerance():
    cmd = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--n", "2048"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS, within the documented tolerance" in proc.stdout, proc.stdout
