"""The memory report counts with the engine's accounting on meta tensors, as it would on real ones."""
import json

import torch

from benchmarks import memory_report as report
from cache_core import CacheConfig, ForecasterConfig

TINY = report.ModelSize(
    "tiny", layout=(("double_block", 2), ("single_block", 2)),
    streams=(("double_block", (("img", 16), ("txt", 4))), ("single_block", (("img", 20),))),
    modules=(("double_block", (("attn", 16), ("mlp", 16))), ("single_block", (("attn_mlp", 20),))),
    width=8, latent=(4, 8, 8), grid=(4, 4), dtype=torch.bfloat16, conditionings=2)


def test_meta_tensors_count_the_bytes_real_tensors_hold():
    sites = report.SITES[:2]  # model (a latent grid) and span (token grids)
    meta = report.measure([TINY], sites=sites, device="meta")
    real = report.measure([TINY], sites=sites, device="cpu")
    assert meta == real
    assert all(row["bytes_auto"] > 0 for row in meta)


def test_taylor2_at_flux_dev_size_against_the_per_module_cache():
    rows = report.measure([report.FLUX_DEV], forecasters=report.QUICK_FORECASTERS, sites=report.QUICK_SITES)
    per_module_tokens = 19 * (2 * 4096 + 2 * 512) + 38 * 4608
    assert rows[0]["baseline_bytes"] == 3 * 2 * 3072 * per_module_tokens  # 3 bf16 terms per module output
    taylor2 = next(r for r in rows if r["forecaster"] == "taylor2")
    # span: 3 values (img, txt, single) of 4096 + 512 + 4608 tokens; bf16 value + two float32 differences
    assert taylor2["bytes_auto"] == (4096 + 512 + 4608) * 3072 * (2 + 4 + 4)
    assert taylor2["bytes_fp32"] == (4096 + 512 + 4608) * 3072 * 12
    assert report.target(rows)["met"]


def test_quick_report_writes_markdown_and_json(tmp_path):
    assert report.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory_report.json").read_text())
    assert {r["model"] for r in data["rows"]} == {report.FLUX_DEV.name, report.WAN_14B.name}
    assert "share of baseline" in (tmp_path / "memory_report.md").read_text()


def test_engine_counts_a_value_once_per_conditioning():
    config, values = CacheConfig(forecaster=ForecasterConfig("taylor", 1)), report.site_values(TINY, report.SITES[1])
    assert report.engine_bytes(config, values, 2) == 2 * report.engine_bytes(config, values, 1)
