"""The pack in a real ComfyUI server, as a user runs it: main.py, POST /prompt, websocket, GET /history.

The host's base directory is a temporary folder whose custom_nodes/ holds links to this checkout
(the product) and to the fixture pack, so nothing is copied or installed into the host.
"""
import json
import os
import time
import urllib.error
import urllib.request
import uuid

import pytest

from benchmarks.graphs import wan_graph, with_cache
from benchmarks.server import get as _get, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, paths):
    base = tmp_path_factory.mktemp("server")
    with running_server(str(base), {paths["wan_name"]: paths["wan"]}) as running:
        yield running.url, base


def test_server_lists_the_nodes_and_serves_the_frontend_extension(server):
    url, _ = server
    status, body = _get(url + "/object_info/ApplyFeatureCache")
    info = json.loads(body)["ApplyFeatureCache"]
    assert status == 200 and info["display_name"] == "Apply Feature Cache"
    status, extensions = _get(url + "/extensions")
    script = next(e for e in json.loads(extensions) if e.endswith("feature_cache.js"))
    status, source = _get(url + script)
    assert status == 200 and b"feature_cache.progress" in source


def test_prompt_over_http_streams_progress_and_reports_in_history(server, paths):
    import websocket
    url, base = server
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(url.replace("http", "ws") + f"/ws?clientId={client_id}", timeout=60)
    graph = wan_graph({**paths, "wan_labels": paths["wan_labels"]}, steps=4)
    graph = with_cache(graph, policy={"method": "fixed", "threshold": 2.0})
    request = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph, "client_id": client_id}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as error:
        pytest.fail(f"/prompt refused the graph: {error.read().decode()}")
    progress = []
    deadline = time.time() + 120
    while time.time() < deadline:
        message = ws.recv()
        if not isinstance(message, str):
            continue
        event = json.loads(message)
        if event["type"] == "feature_cache.progress":
            progress.append(event["data"])
        if event["type"] == "execution_error":
            pytest.fail(f"execution failed: {event['data']}")
        if event["type"] == "executing" and event["data"].get("node") is None \
                and event["data"].get("prompt_id") == prompt_id:
            break
    ws.close()
    assert progress and progress[0]["step"] == 1 and progress[-1]["done"] and progress[-1]["full"]
    assert progress[-1]["node"] == "cache_apply" and len(progress[-1]["columns"]) == 4
    _, body = _get(url + f"/history/{prompt_id}")
    outputs = json.loads(body)[prompt_id]["outputs"]
    report = outputs["cache_map"]["feature_cache_report"][0]
    assert report["evaluations_computed"] == 2 and report["evaluations_filled"] == 2
    assert any(f.endswith(".json") for f in os.listdir(base / "output" / "feature_cache"))
