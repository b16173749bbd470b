"""Soak through the real server: many varied prompts on one server process, and the Cache Map
across prompts whose Apply Feature Cache output the server reuses from its cache."""
import json
import random
import statistics
import time
import urllib.error
import urllib.request
import uuid

import pytest

from benchmarks.graphs import GRAPHS, with_cache

PROMPTS = 50
SAMPLERS = ["euler", "heun", "heunpp2", "dpmpp_2m", "uni_pc", "dpmpp_2s_ancestral", "lcm", "dpm_2"]


class Client:
    """Queues prompts over HTTP and follows them on the websocket, as the browser does."""

    def __init__(self, server):
        import websocket
        self.server = server
        self.client_id = str(uuid.uuid4())
        self.ws = websocket.create_connection(server.url.replace("http", "ws") + f"/ws?clientId={self.client_id}",
                                             timeout=120)

    def queue(self, graph) -> str:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.server.url + "/prompt", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            pytest.fail(f"/prompt refused the graph: {error.read().decode()}")

    def finished(self):
        """Yields the id of each prompt as it finishes; fails on an execution error."""
        while True:
            message = self.ws.recv()
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            if event["type"] == "execution_error":
                pytest.fail(f"prompt failed: {event['data'].get('exception_message')}")
            if event["type"] == "executing" and event["data"].get("node") is None:
                yield event["data"]["prompt_id"]

    def report(self, prompt_id) -> dict:
        _, body = self.server.get(f"/history/{prompt_id}")
        return json.loads(body)[prompt_id]["outputs"]["cache_map"]["feature_cache_report"][0]

    def close(self):
        self.ws.close()


def _resident_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _varied_prompt(rng, paths, i):
    family = rng.choice(list(GRAPHS))
    site = rng.choice(["model", "span", "blocks"])
    graph = GRAPHS[family](paths, steps=rng.randint(2, 6), sampler_name=rng.choice(SAMPLERS), seed=i,
                           cfg=rng.choice([1.0, 2.5]), label=rng.randrange(4), negative_label=rng.randrange(4))
    return with_cache(graph, policy={"method": rng.choice(["fixed", "teacache", "easycache"]),
                                     "speed": rng.choice([0.0, 0.5, 1.0]), "warmup_steps": rng.choice([0, 1])},
                      apply={"site": site, "probe_blocks": 0 if site == "model" else 1},
                      forecaster={"method": "taylor", "order": rng.choice([0, 1, 2])})


def test_fifty_varied_prompts_on_one_server_all_succeed_without_growing_memory(server, paths):
    """Queued back to back; resident memory over the last 15 prompts is within 10% of prompts 6-20 (medians:
    a single reading swings by ~40 MiB with the size of the prompt that just ran and the allocator's arenas,
    which made a comparison of two readings fail without any growth)."""
    rng = random.Random(10)
    client = Client(server)
    try:
        started = time.time()
        ids = [client.queue(_varied_prompt(rng, paths, i)) for i in range(PROMPTS)]
        done, resident = [], []
        for prompt_id in client.finished():
            if prompt_id in ids and prompt_id not in done:
                done.append(prompt_id)
                resident.append(_resident_kib(server.process.pid))
                if len(done) == PROMPTS:
                    break
        assert all(client.report(p)["evaluations"] > 0 for p in ids)
    finally:
        client.close()
    warm, last = statistics.median(resident[5:20]), statistics.median(resident[-15:])
    print(f"soak: {PROMPTS} prompts in {time.time() - started:.1f} s; median resident memory after prompts 6-20 "
          f"{warm / 1024:.0f} MiB, after the last 15 {last / 1024:.0f} MiB")
    assert abs(last - warm) <= 0.10 * warm, (warm, last)


def test_cache_map_of_a_sampler_that_samples_nothing_does_not_show_the_previous_report(server, paths):
    """The server reuses Apply Feature Cache's output (same inputs) when only the sampler changes."""
    client = Client(server)
    try:
        graph = with_cache(GRAPHS["wan"](paths, steps=4, seed=77), policy={"method": "fixed", "threshold": 2.0})
        first = client.queue(graph)
        next(p for p in client.finished() if p == first)
        assert client.report(first)["evaluations"] == 4
        graph["sampler"]["inputs"]["denoise"] = 0.0
        second = client.queue(graph)
        next(p for p in client.finished() if p == second)
        report = client.report(second)
    finally:
        client.close()
    assert report["evaluations"] == 0
    assert "sampled nothing" in report["notes"][-1]
