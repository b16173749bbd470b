"""Unit tests import cache_core from the repo root; integration tests boot the real host (benchmarks/host.py)."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)  # appended, never first: the host's own top-level `nodes` module must win
