"""LLM labelling through the real anthropic and openai client classes over a mock HTTP transport."""

import json

import pytest

anthropic = pytest.importorskip("anthropic", reason="the llm extra (anthropic) is not installed")
openai = pytest.importorskip("openai", reason="the llm extra (openai) is not installed")
try:  # the clients moved from httpx to its successor httpx2
    import httpx2 as httpx
except ImportError:
    import httpx

from discovery.llm import LLMClient, LLMError, ReplyCache, feature_prompt, label_all  # noqa: E402

GOOD = json.dumps({"label": "distorted electric guitar", "description": "Fires on overdriven guitar riffs."})


def _body(api, text):
    if api == "anthropic":
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _client(api, monkeypatch, responses):
    """A client whose HTTP calls get the given (status, text) responses in turn (the last repeats)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    calls = []

    def handler(request):
        status, text = responses[min(len(calls), len(responses) - 1)]
        calls.append(request)
        if status != 200:
            return httpx.Response(status, json={"error": {"type": "error", "message": f"status {status}"}})
        return httpx.Response(200, json=_body(api, text))

    client = LLMClient(api, http_client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=3,
                       sleep=lambda _s: None)
    return client, calls


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_success(api, monkeypatch):
    client, calls = _client(api, monkeypatch, [(200, "Here it is: " + GOOD)])
    reply = client.complete("prompt")
    assert reply.label == "distorted electric guitar" and reply.description.startswith("Fires")
    assert len(calls) == 1


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_rate_limit_then_success(api, monkeypatch):
    client, calls = _client(api, monkeypatch, [(429, ""), (200, GOOD)])
    assert client.complete("prompt").label == "distorted electric guitar"
    assert len(calls) == 2


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_server_error_forever_is_recorded_not_raised(api, monkeypatch):
    client, calls = _client(api, monkeypatch, [(500, "")])
    reply = client.complete("prompt")
    assert reply.label is None and "500" in reply.error and len(calls) == 4  # 1 try + 3 retries


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_malformed_reply(api, monkeypatch):
    client, calls = _client(api, monkeypatch, [(200, "I think it is a guitar")])
    reply = client.complete("prompt")
    assert reply.label is None and reply.error.startswith("malformed reply")
    assert len(calls) == 1, "a malformed reply is not retried"


def test_cache_and_concurrency(monkeypatch, tmp_path):
    client, calls = _client("anthropic", monkeypatch, [(200, GOOD)])
    cache = ReplyCache(tmp_path / "cache")
    prompts = {i: f"prompt {i}" for i in range(6)}
    first = label_all(client, prompts, cache, concurrency=3, progress=False)
    assert len(calls) == 6 and all(r.label for r in first.values())
    again = label_all(client, prompts, cache, concurrency=3, progress=False)
    assert len(calls) == 6 and again == first, "cached replies cost no calls"


def test_failed_features_keep_their_heuristic_label(monkeypatch, tmp_path):
    from discovery.features import apply_llm_labels

    client, _ = _client("openai", monkeypatch, [(500, "")])

    class Found:
        features = {"3": {"label": "piano", "top_examples": [{"activation": 1.0, "prompt": "a piano", "tags": [],
                                                              "sample_index": 0}]}}

        class stats:
            import numpy as np
            sample_max = np.zeros((2, 5), np.float16)

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


def test_llm_judge_scores_labels_on_held_out_captions(monkeypatch):
    """A judge that answers 1 exactly for captions naming the label gives a perfect detection score."""
    import re

    import numpy as np

    from discovery.features import _llm_detection

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")

    def handler(request):
        prompt = json.loads(request.content)["messages"][0]["content"]
        label = re.search(r'labelled "([^"]+)"', prompt).group(1)
        captions = re.findall(r"^\d+\. (.*)$", prompt, re.M)
        answers = [int(label in c) for c in captions]
        return httpx.Response(200, json=_body("openai", json.dumps({"answers": answers})))

    client = LLMClient("openai", http_client=httpx.Client(transport=httpx.MockTransport(handler)),
                       sleep=lambda _s: None)
    samples = [{"prompt": f"a {'drums' if i < 10 else 'flute'} song {i}", "tags": []} for i in range(40)]

    class Found:
        features = {"1": {"label": "drums", "top_examples": [{"sample_index": i} for i in range(10)]}}

    _llm_detection(Found, samples, client, None, 2, False)
    assert Found.features["1"]["detection_score_llm"] == 1.0
    assert np.isfinite(Found.features["1"]["detection_score_llm"])
