"""Talking to the judge: an OpenAI-compatible endpoint, retried, cached, and accounted for.

- ``JudgeEndpoint`` wraps ``openai.OpenAI`` (OpenAI itself, or any ``base_url``: vLLM, Ollama,
  a llama.cpp server). The client's own retries are off; ours back off exponentially with
  jitter on 429, 5xx and timeouts (honouring ``Retry-After``), retry unparseable replies, and
  then give up on that one judgement with a recorded reason. A preflight proves the key is
  set, the endpoint answers and the model is served, before any judging.
- ``JudgeCache``: one JSON file per judgement, keyed by the sha256 of everything that shapes
  the reply (judge model, template version, full prompt, sampling settings), written
  atomically. A re-run costs nothing; an interrupted run resumes where it stopped.
- ``Usage`` and ``PRICES``: tokens spent and what they cost, estimated per model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import openai

from raygpt.config import JudgeConfig
from raygpt.errors import RaygptError
from raygpt.judge.prompts import ReplyError, Score
from raygpt.storage import Storage, join

# USD per million tokens (input, output), OpenAI list prices. Dated snapshots
# (gpt-4o-mini-2024-07-18) match their family by prefix; unknown models cost "n/a".
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
}


def price_of(model: str, config: JudgeConfig) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens: the spec's override, else the longest matching prefix."""
    if config.price_input_per_mtok is not None and config.price_output_per_mtok is not None:
        return config.price_input_per_mtok, config.price_output_per_mtok
    matches = [name for name in PRICES if model == name or model.startswith(name + "-")]
    return PRICES[max(matches, key=len)] if matches else None


# Request parameters a 400 may name, and the spec key that sets each.
SETTING_KEYS = {"max_completion_tokens": "judge.max_tokens", "max_tokens": "judge.max_tokens",
                "temperature": "judge.temperature", "seed": "judge.seed"}


def sampling_settings(config: JudgeConfig, seed: int) -> dict[str, Any]:
    """The sampling settings that shape a reply (and so belong in its cache key)."""
    return {"temperature": config.temperature, "seed": seed, "max_tokens": config.max_tokens}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def cost(self, price: tuple[float, float] | None) -> float | None:
        if price is None:
            return None
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6


@dataclass
class Outcome:
    """One judgement: the scores by label, or why there are none."""

    scores: dict[str, Score] | None
    reply: str | None
    attempts: int
    usage: Usage = field(default_factory=Usage)
    failure: str | None = None
    cached: bool = False


class EndpointGone(RaygptError):
    """The endpoint stopped accepting calls mid-run (key revoked, model unloaded, server down):
    judging stops, and what is cached so far is kept for the re-run."""


class JudgeEndpoint:
    """One judge model behind an OpenAI-compatible API, with our retry policy."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.stopping = threading.Event()
        """Set when the run is aborting: calls in their backoff stop waiting and give up."""
        self._structured = config.structured_output
        self._lock = threading.Lock()
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise RaygptError(
                    f"judge: ${config.api_key_env} is not set: export the judge's API key in it "
                    f"(or set judge.api_key_env to the variable that holds it; '' for endpoints without keys)")
        else:
            api_key = "no-key"  # local servers (vLLM, Ollama, llama.cpp) ignore it, the client needs one
        self._secret = api_key if config.api_key_env else None
        self.client = openai.OpenAI(base_url=config.base_url, api_key=api_key, max_retries=0,
                                    timeout=config.timeout_s)
        self.where = str(self.client.base_url).rstrip("/")

    # -- preflight --------------------------------------------------------------------------

    def preflight(self) -> None:
        """Fail before any work when the endpoint cannot be reached, refuses the key, or does
        not serve the judge model."""
        model = self.config.model
        for attempt in range(self.config.max_retries + 1):
            try:
                served = [m.id for m in self.client.models.list().data]
                break
            except openai.AuthenticationError:
                raise RaygptError(f"judge endpoint {self.where} rejected the key in ${self.config.api_key_env} "
                                  f"(401): check it") from None
            except openai.NotFoundError:
                return  # some servers do not list models; the first call will say if the model is missing
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError) as e:
                if attempt == self.config.max_retries:
                    raise RaygptError(f"judge endpoint {self.where} keeps failing ({self._describe(e)}): try again later") from None
                time.sleep(self._backoff(attempt, e))
            except openai.APIConnectionError:
                raise RaygptError(f"judge endpoint {self.where} cannot be reached: check judge.base_url and "
                                  f"that the server is running") from None
            except openai.APIStatusError as e:
                raise RaygptError(f"judge endpoint {self.where}: listing models failed ({self._describe(e)})") from None
        # Ollama lists "llama3:latest" for "llama3".
        if model not in served and f"{model}:latest" not in served:
            listed = ", ".join(sorted(served)[:20]) or "none"
            raise RaygptError(f"judge model {model!r} is not served by {self.where} (it serves: {listed}): "
                              f"set judge.model to one of them")

    # -- calls ------------------------------------------------------------------------------

    def complete(self, messages: list[dict], response_format: dict | None, seed: int,
                 parse: Callable[[str], dict[str, Score]]) -> Outcome:
        """Ask until a reply parses, or the retries run out (a failure, with its reason)."""
        usage = Usage()
        problem, transient_error = "", None
        attempt = 0
        while attempt <= self.config.max_retries:
            if self.stopping.is_set():
                return Outcome(None, None, attempt, usage, failure="stopped: the run was aborted")
            attempt += 1
            kwargs = self._request(messages, response_format, seed)
            try:
                response = self.client.chat.completions.create(**kwargs)
            except openai.BadRequestError as e:
                if "response_format" in kwargs:
                    # The endpoint does not do structured output: ask for JSON in words only
                    # (the template already does) and validate as always. Not a retry.
                    with self._lock:
                        self._structured = False
                    attempt -= 1
                    continue
                message = str(e).lower()
                for parameter, key in SETTING_KEYS.items():
                    if parameter in message:
                        # A setting the endpoint refuses fails every call alike: stop, say which.
                        raise EndpointGone(f"judge endpoint {self.where} refuses {parameter} for model "
                                           f"{self.config.model!r} ({self._describe(e)}): change {key}") from None
                return Outcome(None, None, attempt, usage, failure=f"request rejected: {self._describe(e)}")
            except openai.AuthenticationError:
                raise EndpointGone(f"judge endpoint {self.where} rejected the key in ${self.config.api_key_env} (401)") from None
            except openai.PermissionDeniedError as e:
                raise EndpointGone(f"judge endpoint {self.where} refused access ({self._describe(e)})") from None
            except openai.NotFoundError as e:
                raise EndpointGone(f"judge endpoint {self.where}: model {self.config.model!r} not found "
                                   f"({self._describe(e)})") from None
            except openai.RateLimitError as e:
                if getattr(e, "code", None) == "insufficient_quota":
                    # OpenAI says 429 for an empty account too; waiting will not refill it.
                    raise EndpointGone(f"judge endpoint {self.where}: the account's quota is used up "
                                       f"({self._describe(e)})") from None
                problem, transient_error = self._describe(e), e
                if attempt <= self.config.max_retries:
                    self.stopping.wait(self._backoff(attempt - 1, e))
                continue
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                # 429, 5xx, 408/409, timeouts and dropped connections pass; anything else will not.
                status = getattr(e, "status_code", None)
                if status is not None and status not in (408, 409, 429) and status < 500:
                    return Outcome(None, None, attempt, usage, failure=f"request rejected: {self._describe(e)}")
                problem, transient_error = self._describe(e), e
                if attempt <= self.config.max_retries:
                    self.stopping.wait(self._backoff(attempt - 1, e))
                continue
            transient_error = None
            if response.usage is not None:
                usage.add(Usage(response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0))
            reply = response.choices[0].message.content if response.choices else None
            try:
                if not reply:
                    raise ReplyError("empty reply")
                return Outcome(parse(reply), reply, attempt, usage)
            except ReplyError as e:
                # No backoff: the endpoint is fine, the reply was not.
                problem = f"unparseable reply: {e}"
        if isinstance(transient_error, openai.APIConnectionError) and not isinstance(transient_error, openai.APITimeoutError):
            raise EndpointGone(f"judge endpoint {self.where} cannot be reached any more ({problem})")
        return Outcome(None, None, attempt, usage, failure=f"{problem} (after {attempt} attempts)")

    def _request(self, messages: list[dict], response_format: dict | None, seed: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(model=self.config.model, messages=messages,
                                      temperature=self.config.temperature, seed=seed)
        # OpenAI's newer (reasoning) models accept only max_completion_tokens; local servers
        # (Ollama, older vLLM and llama.cpp) know only max_tokens.
        limit_key = "max_tokens" if self.config.base_url else "max_completion_tokens"
        kwargs[limit_key] = self.config.max_tokens
        if response_format is not None and self._structured:
            kwargs["response_format"] = response_format
        return kwargs

    def _describe(self, error: Exception) -> str:
        """``_describe`` with the key blanked out: some servers and proxies echo the key they
        were sent in their error text, which ends up in messages and judgement records."""
        return _describe(error, self._secret)

    def _backoff(self, attempt: int, error: Exception) -> float:
        """Exponential with full jitter, never shorter than the server's Retry-After."""
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        retry_after = _retry_after_s(error)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.backoff_max_s))
        return delay


def _retry_after_s(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                return None  # an HTTP date: rare from LLM servers; exponential backoff covers it
    return None


def _describe(error: Exception, secret: str | None = None) -> str:
    status = getattr(error, "status_code", None)
    kind = type(error).__name__
    message = str(getattr(error, "message", "") or error)
    if secret:
        message = message.replace(secret, "<api key>")  # before the cut, which could leave a piece of it
    message = message.splitlines()[0][:200]
    return f"{kind} {status}: {message}" if status else f"{kind}: {message}"


class JudgeCache:
    """Judge replies on disk (or S3), one JSON file per key, so no judgement is bought twice."""

    def __init__(self, root: str, storage: Storage):
        self.root = root
        self.storage = storage

    @staticmethod
    def key(endpoint: str | None, model: str, template: str, messages: list[dict], settings: dict[str, Any]) -> str:
        """sha256 of everything that shapes the reply: the endpoint (one model name may be served
        differently by Ollama and vLLM), judge model, template name and version, the full prompt,
        and the sampling settings (temperature, seed, max_tokens)."""
        blob = json.dumps({"endpoint": endpoint or "openai", "model": model, "template": template,
                           "messages": messages, "settings": settings}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> str:
        return join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        """The cached entry, or None when absent or unreadable (a torn file is re-judged)."""
        uri = self.path(key)
        if not self.storage.exists(uri):
            return None
        try:
            entry = json.loads(self.storage.read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key and "reply" in entry else None

    def put(self, key: str, reply: str, usage: Usage, attempts: int, described: dict[str, Any]) -> None:
        self.storage.write_json(self.path(key), {"key": key, "reply": reply, "usage": asdict(usage),
                                                 "attempts": attempts, "created": time.time(), **described})
