"""The bundled tiny models really learned: their samples classify back to their labels far above chance."""
import os
import subprocess
import sys

from benchmarks.host import REPO_ROOT


def test_bundled_models_are_committed_small_and_fp16():
    from safetensors import safe_open
    for name in ("tiny_wan", "tiny_flux"):
        path = os.path.join(REPO_ROOT, "benchmarks", "models", f"{name}.safetensors")
        assert os.path.getsize(path) <= 10 * 2**20
        with safe_open(path, "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


def test_samples_classify_back_to_their_labels():
    result = subprocess.run([sys.executable, "-m", "benchmarks.check_learned", "--quick", "--threads", "1",
                             "--min-accuracy", "0.8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images" in result.stdout
