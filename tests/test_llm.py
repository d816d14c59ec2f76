"""LLM labelling through the real anthropic and openai clients, talking HTTP to a fake provider on
127.0.0.1: retries are the SDKs' own and wait as long as ``Retry-After`` says."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("anthropic", reason="the llm extra (anthropic) is not installed")
pytest.importorskip("openai", reason="the llm extra (openai) is not installed")

from discovery.llm import LLMClient, LLMError, ReplyCache, feature_prompt, label_all  # noqa: E402

GOOD = json.dumps({"label": "distorted electric guitar", "description": "Fires on overdriven guitar riffs."})
QUICK_RETRY = {"retry-after-ms": "10"}  # keeps retry tests fast; both SDKs read it before Retry-After


def _body(api, text):
    if api == "anthropic":
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeProvider:
    """An HTTP server answering each request with ``respond(request_json, call_index) -> (status, text,
    headers)``; it records when each request arrived."""

    def __init__(self, api, respond):
        self.api, self.respond, self.arrivals, self.lock = api, respond, [], threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with provider.lock:
                    provider.arrivals.append(time.monotonic())
                    index = len(provider.arrivals) - 1
                status, text, headers = provider.respond(request, index)
                error = {"error": {"type": "error", "message": f"status {status}"}}
                data = json.dumps(_body(api, text) if status == 200 else error).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}" + ("/v1" if api == "openai" else "")

    @property
    def calls(self) -> int:
        return len(self.arrivals)


@pytest.fixture
def provider(monkeypatch):
    """``provider(api, responses)``: a client and its fake provider, which answers with the given
    (status, text, headers) in turn, the last one repeating (or a ``respond`` function)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    servers = []

    def make(api, responses, max_retries=3):
        respond = responses if callable(responses) else (lambda _req, i: responses[min(i, len(responses) - 1)])
        servers.append(FakeProvider(api, respond))
        return LLMClient(api, base_url=servers[-1].base_url, max_retries=max_retries), servers[-1]

    yield make
    for fake in servers:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_success(api, provider):
    client, fake = provider(api, [(200, "Here it is: " + GOOD, {})])
    reply = client.complete("prompt")
    assert reply.label == "distorted electric guitar" and reply.description.startswith("Fires")
    assert fake.calls == 1


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_rate_limit_waits_as_long_as_retry_after_says(api, provider):
    """Without the header the SDKs' first back-off is at most 0.5 s; Retry-After: 1 makes it a second."""
    client, fake = provider(api, [(429, "", {"Retry-After": "1"}), (200, GOOD, {})])
    assert client.complete("prompt").label == "distorted electric guitar"
    assert fake.calls == 2
    assert 1.0 <= fake.arrivals[1] - fake.arrivals[0] < 10.0


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_server_error_forever_is_recorded_not_raised(api, provider):
    client, fake = provider(api, [(500, "", QUICK_RETRY)])
    reply = client.complete("prompt")
    assert reply.label is None and "500" in reply.error and fake.calls == 4  # 1 try + 3 retries


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_a_bad_request_is_not_retried(api, provider):
    client, fake = provider(api, [(400, "", QUICK_RETRY)])
    reply = client.complete("prompt")
    assert reply.label is None and "400" in reply.error and fake.calls == 1


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_malformed_reply(api, provider):
    client, fake = provider(api, [(200, "I think it is a guitar", {})])
    reply = client.complete("prompt")
    assert reply.label is None and reply.error.startswith("malformed reply")
    assert fake.calls == 1, "a malformed reply is not retried"


def test_cache_and_concurrency(provider, tmp_path):
    in_flight, most, lock = [0], [0], threading.Lock()
    together = threading.Barrier(3, timeout=20)  # no reply until 3 calls are in flight (not a sleep: no race)

    def slow(_request, _index):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        together.wait()
        with lock:
            in_flight[0] -= 1
        return 200, GOOD, {}

    client, fake = provider("anthropic", slow)
    cache = ReplyCache(tmp_path / "cache")
    prompts = {i: f"prompt {i}" for i in range(6)}
    first = label_all(client, prompts, cache, concurrency=3, progress=False)
    assert fake.calls == 6 and all(r.label for r in first.values())
    assert most[0] == 3, f"--llm_concurrency 3 should keep 3 calls in flight, saw at most {most[0]}"
    again = label_all(client, prompts, cache, concurrency=3, progress=False)
    assert fake.calls == 6 and again == first, "cached replies cost no calls"
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json"] * 6, "no temp files left"


def test_failures_are_not_cached(provider, tmp_path):
    client, fake = provider("openai", [(500, "", QUICK_RETRY), (500, "", QUICK_RETRY), (200, GOOD, {})],
                            max_retries=1)
    cache = ReplyCache(tmp_path / "cache")
    assert label_all(client, {0: "p"}, cache, progress=False)[0].label is None
    assert label_all(client, {0: "p"}, cache, progress=False)[0].label == "distorted electric guitar"
    assert fake.calls == 3


def test_failed_features_keep_their_heuristic_label(provider):
    from discovery.features import apply_llm_labels

    client, _ = provider("openai", [(500, "", QUICK_RETRY)])

    class Found:
        features = {"3": {"label": "piano", "top_examples": [{"activation": 1.0, "prompt": "a piano", "tags": [],
                                                              "sample_index": 0}]}}

        class stats:
            sample_max = np.zeros((2, 5), np.float16)
            finite_rows_per_sample = np.ones(2, np.int64)

    class Store:
        samples = [{"prompt": "x", "tags": []}, {"prompt": "y", "tags": []}]

    apply_llm_labels(Found, Store, client, "openai", None, None, 2, False)
    assert Found.features["3"]["label"] == "piano" and "500" in Found.features["3"]["llm_error"]


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(LLMError, match="needs ANTHROPIC_API_KEY"):
        LLMClient("anthropic")


def test_prompt_shows_activations_tags_and_contrast():
    text = feature_prompt(7, [{"activation": 2.5, "prompt": "loud drums", "tags": ["drums"]}],
                          [{"prompt": "quiet flute"}])
    assert "activation 2.500: loud drums [tags: drums]" in text and "quiet flute" in text and "JSON" in text


def test_llm_judge_scores_labels_on_held_out_captions(provider):
    """A judge that answers 1 exactly for captions naming the label gives a perfect detection score."""
    import re

    from discovery.features import _llm_detection

    def judge(request, _index):
        prompt = request["messages"][0]["content"]
        label = re.search(r'labelled "([^"]+)"', prompt).group(1)
        captions = re.findall(r"^\d+\. (.*)$", prompt, re.M)
        return 200, json.dumps({"answers": [int(label in c) for c in captions]}), {}

    client, _ = provider("openai", judge)
    samples = [{"prompt": f"a {'drums' if i < 10 else 'flute'} song {i}", "tags": []} for i in range(40)]

    class Found:
        features = {"1": {"label": "drums", "top_examples": [{"sample_index": i} for i in range(10)]}}

        class stats:
            finite_rows_per_sample = np.ones(len(samples), np.int64)

    _llm_detection(Found, samples, client, None, 2, False)
    assert Found.features["1"]["detection_score_llm"] == 1.0
