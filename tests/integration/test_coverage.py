"""Every family the adapters describe, built tiny with the host's own classes, at every site (make coverage)."""
import json

from benchmarks import coverage


def test_every_family_is_ok_at_every_site_on_this_host(host, tmp_path):
    result = coverage.run(out_dir=str(tmp_path))
    print("\n" + coverage.format_matrix(result))
    assert json.loads((tmp_path / "coverage.json").read_text()) == result["matrix"]
    assert set(result["matrix"]) == set(coverage.FAMILIES)
    for name, row in result["matrix"].items():
        available = coverage.host_has(coverage.FAMILIES[name])
        expected = {site: coverage.OK if available else coverage.NA for site in coverage.SITES}
        if "U-Net" in name:  # DeepCache: one deep branch, no per-block site
            expected["blocks"] = coverage.NA
        if name == "Cosmos 1":  # its blocks take batch-last hidden states: whole-model site only
            expected.update(span=coverage.NA, blocks=coverage.NA)
        assert row == expected, (name, row, result["errors"])
