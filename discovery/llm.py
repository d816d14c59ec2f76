"""LLM labels through the official ``anthropic`` and ``openai`` clients.

Calls run concurrently up to a limit and are cached on disk by (model, prompt hash). Retries are
the SDKs' own: rate limits, server errors, timeouts and dropped connections are retried, waiting
as long as the response's ``Retry-After`` asks, else with exponential back-off. A feature whose
calls still fail keeps its heuristic label with the error recorded: a run never loses the
features it computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sae_core.errors import UsageError
from sae_core.files import write_json

DEFAULT_MODELS = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-5.4-mini"}
KEY_VARIABLES = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class LLMError(UsageError):
    """LLM labelling that cannot start (missing package or key)."""


@dataclass(frozen=True)
class Reply:
    """A parsed label, or the error that prevented one."""

    label: str | None = None
    description: str | None = None
    error: str | None = None


def feature_prompt(feature: int, top: Sequence[dict], contrast: Sequence[dict]) -> str:
    """Top captions with activations and tags, plus low-activation contrast examples."""
    lines = [
        "You are labelling one feature of a sparse autoencoder trained on a music generation model.",
        f"Feature {feature} activates most strongly on music generated from these captions:",
    ]
    for ex in top:
        tags = ", ".join(ex.get("tags", [])) or "none"
        lines.append(f"- activation {ex['activation']:.3f}: {ex['prompt']} [tags: {tags}]")
    if contrast:
        lines.append("It stays near zero on these captions:")
        for ex in contrast:
            lines.append(f"- {ex['prompt']}")
    lines.append(
        'Reply with JSON only: {"label": "<a musical concept in 2-5 words>", '
        '"description": "<one sentence on what the feature detects>"}'
    )
    return "\n".join(lines)


def judge_prompt(label: str, captions: Sequence[str]) -> str:
    """Ask which captions a label describes (the LLM judge of a label's detection score)."""
    lines = [f'A feature of a music model was labelled "{label}". For each caption below, answer 1 if the '
             "label describes the music it asks for, else 0."]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(captions)]
    lines.append(f'Reply with JSON only: {{"answers": [<{len(captions)} values, 0 or 1, in order>]}}')
    return "\n".join(lines)


def _json_object(text: str):
    match = re.search(r"\{.*\}", text or "", re.S)
    try:
        return json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None


def parse_judgement(text: str) -> list[int] | None:
    data = _json_object(text)
    answers = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(answers, list) or any(a not in (0, 1) for a in answers):
        return None
    return [int(a) for a in answers]


def parse_reply(text: str) -> Reply:
    data = _json_object(text)
    if not isinstance(data, dict) or not isinstance(data.get("label"), str) or not data["label"].strip():
        return Reply(error=f"malformed reply: {(text or '')[:120]!r}")
    description = data.get("description")
    return Reply(label=" ".join(data["label"].split()), description=description if isinstance(description, str) else None)


class LLMClient:
    """One provider's SDK client, retrying as the SDK does; ``complete`` returns the parsed reply."""

    def __init__(self, api: str, model: str | None = None, *, base_url: str | None = None, max_retries: int = 5,
                 timeout: float = 60.0):
        if api not in DEFAULT_MODELS:
            raise LLMError(f"--llm_api must be anthropic or openai, got {api!r}")
        key = os.environ.get(KEY_VARIABLES[api])
        if not key:
            raise LLMError(f"--use_llm --llm_api {api} needs {KEY_VARIABLES[api]} in the environment")
        try:
            module = __import__(api)
        except ImportError:
            raise LLMError(f"--llm_api {api} needs the {api} package: pip install -e '.[llm]'") from None
        self.api, self.model = api, model or DEFAULT_MODELS[api]
        client_cls = module.Anthropic if api == "anthropic" else module.OpenAI
        where = {"base_url": base_url} if base_url else {}  # else the SDK's default endpoint
        self.client = client_cls(api_key=key, max_retries=max_retries, timeout=timeout, **where)

    def _call(self, prompt: str) -> str:
        if self.api == "anthropic":
            msg = self.client.messages.create(model=self.model, max_tokens=300,
                                              messages=[{"role": "user", "content": prompt}])
            return "".join(block.text for block in msg.content if getattr(block, "type", "") == "text")
        reply = self.client.chat.completions.create(model=self.model, max_completion_tokens=1000,
                                                    messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content or ""

    def complete(self, prompt: str, parse: Callable[[str], Reply] = parse_reply) -> Reply:
        try:
            text = self._call(prompt)
        except Exception as err:  # noqa: BLE001 - after the SDK's retries, every failure becomes a recorded error
            return Reply(error=f"{type(err).__name__}: {str(err)[:200]}")
        return parse(text)


class ReplyCache:
    """Replies on disk, one JSON file per (model, prompt) hash."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _path(self, model: str, prompt: str) -> Path:
        digest = hashlib.sha256((model + "\n" + prompt).encode()).hexdigest()
        return self.dir / f"{digest}.json"

    def get(self, model: str, prompt: str) -> Reply | None:
        path = self._path(model, prompt)
        if path.exists():
            data = json.loads(path.read_text())
            return Reply(label=data["label"], description=data.get("description"))
        return None

    def put(self, model: str, prompt: str, reply: Reply) -> None:
        if reply.label is None:
            return  # failures are retried on the next run, not cached
        write_json(self._path(model, prompt), {"label": reply.label, "description": reply.description})


def label_all(client: LLMClient, prompts: dict[int, str], cache: ReplyCache | None, concurrency: int = 4,
              progress: bool = True, parse: Callable[[str], Reply] = parse_reply,
              desc: str = "LLM labels") -> dict[int, Reply]:
    """Run every feature's prompt concurrently; cached replies cost nothing."""
    from tqdm import tqdm

    def one(item):
        feature, prompt = item
        if cache is not None and (hit := cache.get(client.model, prompt)) is not None:
            return feature, hit
        reply = client.complete(prompt, parse)
        if cache is not None:
            cache.put(client.model, prompt, reply)
        return feature, reply

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(tqdm(pool.map(one, prompts.items()), total=len(prompts), desc=desc,
                            disable=not progress))
    return dict(results)
