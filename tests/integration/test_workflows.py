"""Shipped workflows: every node exists in the host with all its required inputs, links are well formed;
the demo workflow runs end to end."""
import glob
import json
import os

import pytest

from benchmarks.host import REPO_ROOT

WORKFLOWS = sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "*.json")))


def test_there_is_a_workflow_per_supported_family():
    names = " ".join(os.path.basename(p) for p in WORKFLOWS)
    assert "flux" in names and "wan" in names and "demo" in names


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_nodes_and_links_are_valid_for_the_host(path, host):
    with open(path) as f:
        graph = json.load(f)
    assert any(node["class_type"] == "ApplyFeatureCache" for node in graph.values())
    for node_id, node in graph.items():
        cls = host.node_classes.get(node["class_type"])
        assert cls is not None, f"{node_id}: unknown node {node['class_type']}"
        spec = cls.INPUT_TYPES()
        missing = set(spec["required"]) - set(node["inputs"])
        assert not missing, f"{node_id} ({node['class_type']}) lacks {missing}"
        known = set(spec["required"]) | set(spec.get("optional", {}))
        assert set(node["inputs"]) <= known, f"{node_id}: unknown inputs {set(node['inputs']) - known}"
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, index = value
                assert source in graph, f"{node_id}.{name} links to missing node {source}"
                outputs = host.node_classes[graph[source]["class_type"]].RETURN_TYPES
                assert index < len(outputs)
                expected = spec["required"].get(name, spec.get("optional", {}).get(name))[0]
                assert outputs[index] == expected or expected == "*", f"{node_id}.{name}: {outputs[index]} != {expected}"


def test_demo_runs_and_writes_its_outputs(host, tmp_path, capsys):
    from benchmarks import demo
    assert demo.main(["--out", str(tmp_path)]) == 0
    for name in ("cached.png", "uncached.png", "cache_map.png", "report.json"):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["evaluations"] == 30 and 0 < report["compute_fraction"] <= 1
    assert "PSNR" in capsys.readouterr().out
