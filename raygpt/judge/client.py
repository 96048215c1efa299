"""Talking to the judge: an OpenAI-compatible endpoint, retried, cached, and accounted for.

- ``JudgeEndpoint`` wraps ``openai.OpenAI`` (OpenAI itself, or any ``base_url``: vLLM, Ollama,
  a llama.cpp server). HTTP failures are the client's to retry (``max_retries``: 408, 409,
  429, 5xx, timeouts and dropped connections, with exponential backoff that honours
  ``Retry-After``); raygpt asks again only when a reply does not parse, stops at once on an
  exhausted quota (OpenAI's 429 ``insufficient_quota``, which the client is told not to retry)
  and, once the run aborts, lets no request leave. A judgement that still fails is given up
  with a recorded reason. A preflight proves the key is set, the endpoint answers and the
  model is served, before any judging.
- ``JudgeCache``: one JSON file per judgement, keyed by the sha256 of everything that shapes
  the reply (who the judge is, judge model, template version, full prompt, sampling settings),
  written atomically. A re-run costs nothing; an interrupted run resumes where it stopped.
  Who the judge is (``judge_identity``) leaves the address out: the same server reached on
  another port or host name reuses its judgements, while another server that lists the model
  differently does not. Entries of older caches, keyed by the address, are still read.
- ``Usage``, ``PRICES`` and ``BATCH_DISCOUNT``: tokens spent and what they cost, estimated per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import openai

from raygpt.config import JudgeConfig, without_userinfo
from raygpt.errors import RaygptError
from raygpt.judge.prompts import ReplyError, Score
from raygpt.storage import Storage, join

logger = logging.getLogger(__name__)

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


BATCH_DISCOUNT = 0.5
"""What the Batch API charges per token, as a share of the price of a direct call (OpenAI's)."""


def price_of(model: str, config: JudgeConfig) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens: the spec's override, else the longest matching prefix."""
    if config.price_input_per_mtok is not None and config.price_output_per_mtok is not None:
        return config.price_input_per_mtok, config.price_output_per_mtok
    matches = [name for name in PRICES if model == name or model.startswith(name + "-")]
    return PRICES[max(matches, key=len)] if matches else None


QUOTA = "insufficient_quota"
"""OpenAI's error code for an account without credit (sent with status 429)."""

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


def format_cost(cost: Any) -> str:
    """A cost estimate in dollars for the terminal; "n/a" where the price is unknown."""
    return "n/a" if cost is None or cost == "n/a" else f"${cost:.4f}"


@dataclass
class Outcome:
    """One judgement: the scores by label, or why there are none."""

    scores: dict[str, Score] | None
    reply: str | None
    attempts: int
    usage: Usage = field(default_factory=Usage)
    failure: str | None = None
    cached: bool = False
    batch: str | None = None
    """The id of the batch that answered it (``judge.batch``); None for a direct call."""


class EndpointGone(RaygptError):
    """The endpoint stopped accepting calls mid-run (key revoked, model unloaded, server down):
    judging stops, and what is cached so far is kept for the re-run."""


class _Aborted(openai.OpenAIError):
    """Raised in place of sending a request once the run is aborting (the client passes its own
    error type through without retrying it)."""


class JudgeEndpoint:
    """One judge model behind an OpenAI-compatible API: the client retries HTTP failures, this
    asks again for unparseable replies (``complete``)."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.stopping = threading.Event()
        """Set when the run is aborting: no request is sent after it, and none is retried."""
        self._sent = threading.local()
        """Requests sent by this thread for the call it is making: the client retries unseen."""
        self._retry_waits: set[int] = set()
        """Threads whose last response the client will retry after a wait (the ids)."""
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
        base_url = config.base_url
        if self._secret and base_url and without_userinfo(base_url) != base_url:
            # One Authorization header: the API key, which is what the endpoint's protocol defines.
            logger.warning("judge.base_url carries a user:password; the API key in $%s is sent instead "
                           "(judge.api_key_env: '' sends the URL's credentials)", config.api_key_env)
            base_url = without_userinfo(base_url)
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._before_sending],
                                                       "response": [self._on_response]})
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=config.max_retries,
                                    timeout=config.timeout_s, http_client=http)
        self.where = without_userinfo(str(self.client.base_url).rstrip("/"))  # a URL may carry user:password

    # -- what the client sends and may retry ---------------------------------------------------

    def _before_sending(self, request) -> None:
        self._retry_waits.discard(threading.get_ident())
        if self.stopping.is_set():
            raise _Aborted("judging stopped: the run was aborted")
        self._sent.count = getattr(self._sent, "count", 0) + 1

    def _on_response(self, response) -> None:
        """Tell the client (by OpenAI's ``x-should-retry`` header) not to retry once the run is
        aborting, nor an exhausted quota: OpenAI answers 429 for a rate limit and for an empty
        account alike, and waiting refills only the first. Note which threads will wait to retry."""
        if self.stopping.is_set():
            response.headers["x-should-retry"] = "false"
        elif response.status_code == 429:
            response.read()
            try:
                error = response.json().get("error") or {}
            except (ValueError, AttributeError):
                error = {}
            if isinstance(error, dict) and QUOTA in (error.get("code"), error.get("type")):
                response.headers["x-should-retry"] = "false"
        retried = response.status_code in (408, 409, 429) or response.status_code >= 500
        if retried and response.headers.get("x-should-retry") != "false":
            self._retry_waits.add(threading.get_ident())

    def waiting_to_retry(self) -> int:
        """How many threads are asleep in the client's backoff, about to retry: once the run
        aborts, they will send nothing when they wake, so nobody need wait for them."""
        return len(self._retry_waits)

    def _counting(self, request: Callable[[], Any]) -> tuple[Any, int]:
        """``request()``'s result and how many HTTP requests it took; an error is raised with
        the count in its ``raygpt_attempts``."""
        self._sent.count = 0
        try:
            return request(), self._sent.count
        except openai.OpenAIError as e:
            e.raygpt_attempts = self._sent.count
            raise
        finally:
            self._retry_waits.discard(threading.get_ident())

    # -- preflight --------------------------------------------------------------------------

    def preflight(self) -> dict | None:
        """Fail before any work when the endpoint cannot be reached, refuses the key, or does
        not serve the judge model. Returns what the endpoint lists about the model (its
        /v1/models entry), None when it lists no models."""
        model = self.config.model
        try:
            listed = [m.to_dict() for m in self.client.models.list().data]
        except openai.AuthenticationError:
            raise RaygptError(f"judge endpoint {self.where} rejected the key in ${self.config.api_key_env} "
                              f"(401): check it") from None
        except openai.NotFoundError:
            return None  # some servers do not list models; the first call will say if the model is missing
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError) as e:
            raise RaygptError(f"judge endpoint {self.where} keeps failing ({self._describe(e)}): try again later") from None
        except openai.APIConnectionError:
            raise RaygptError(f"judge endpoint {self.where} cannot be reached: check judge.base_url and "
                              f"that the server is running") from None
        except openai.APIStatusError as e:
            raise RaygptError(f"judge endpoint {self.where}: listing models failed ({self._describe(e)})") from None
        # Ollama lists "llama3:latest" for "llama3".
        for name in (model, f"{model}:latest"):
            for entry in listed:
                if entry.get("id") == name:
                    return entry
        served = ", ".join(sorted(str(entry.get("id")) for entry in listed)[:20]) or "none"
        raise RaygptError(f"judge model {model!r} is not served by {self.where} (it serves: {served}): "
                          f"set judge.model to one of them")

    # -- calls ------------------------------------------------------------------------------

    def complete(self, messages: list[dict], response_format: dict | None, seed: int,
                 parse: Callable[[str], dict[str, Score]]) -> Outcome:
        """Ask until a reply parses, or the retries run out (a failure, with its reason). Each
        request is the client's to retry on HTTP failures; a reply that does not parse is asked
        again, up to ``judge.max_retries`` times, with no wait (the endpoint is fine, the reply
        was not). ``attempts`` counts every HTTP request made."""
        usage = Usage()
        attempts, problem = 0, ""
        for _ in range(self.config.max_retries + 1):
            kwargs = self._request(messages, response_format, seed)
            while True:
                if self.stopping.is_set():
                    return Outcome(None, None, attempts, usage, failure="stopped: the run was aborted")
                try:
                    response, sent = self._counting(lambda: self.client.chat.completions.create(**kwargs))
                    attempts += sent
                    break
                except openai.OpenAIError as e:
                    attempts += e.raygpt_attempts
                    if not (isinstance(e, openai.BadRequestError) and "response_format" in kwargs):
                        return self._failed(e, attempts, usage)
                    # The endpoint does not do structured output: ask for JSON in words only
                    # (the template already does) and validate as always. Not a retry.
                    with self._lock:
                        self._structured = False
                    kwargs = self._request(messages, response_format, seed)
            if response.usage is not None:
                usage.add(Usage(response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0))
            reply = response.choices[0].message.content if response.choices else None
            try:
                if not reply:
                    raise ReplyError("empty reply")
                return Outcome(parse(reply), reply, attempts, usage)
            except ReplyError as e:
                problem = f"unparseable reply: {e}"
        return Outcome(None, None, attempts, usage, failure=f"{problem} (after {attempts} attempts)")

    def _failed(self, error: openai.OpenAIError, attempts: int, usage: Usage) -> Outcome:
        """The outcome of a request the client gave up on; EndpointGone where no other call can
        fare better (the key, access, the model, a setting, the quota, the server gone)."""
        if self.stopping.is_set() or isinstance(error, _Aborted):
            return Outcome(None, None, attempts, usage, failure="stopped: the run was aborted")
        self._raise_if_gone(error)
        if isinstance(error, openai.BadRequestError):
            message = str(error).lower()
            for parameter, key in SETTING_KEYS.items():
                if parameter in message:
                    # A setting the endpoint refuses fails every call alike: stop, say which.
                    raise EndpointGone(f"judge endpoint {self.where} refuses {parameter} for model "
                                       f"{self.config.model!r} ({self._describe(error)}): change {key}") from None
        if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
            raise EndpointGone(f"judge endpoint {self.where} cannot be reached any more "
                               f"({self._describe(error)}, after {attempts} attempts)") from None
        status = getattr(error, "status_code", None)
        if status is not None and status not in (408, 409, 429) and status < 500:
            return Outcome(None, None, attempts, usage, failure=f"request rejected: {self._describe(error)}")
        return Outcome(None, None, attempts, usage, failure=f"{self._describe(error)} (after {attempts} attempts)")

    def _raise_if_gone(self, error: openai.OpenAIError, what: str = "") -> None:
        """EndpointGone for what fails every call alike: the key, access, the model, the quota."""
        if isinstance(error, openai.AuthenticationError):
            raise EndpointGone(f"judge endpoint {self.where} rejected the key in ${self.config.api_key_env} (401)") from None
        if isinstance(error, openai.PermissionDeniedError):
            raise EndpointGone(f"judge endpoint {self.where} refused access ({self._describe(error)})") from None
        if isinstance(error, openai.NotFoundError) and not what:
            raise EndpointGone(f"judge endpoint {self.where}: model {self.config.model!r} not found "
                               f"({self._describe(error)})") from None
        if isinstance(error, openai.RateLimitError) and QUOTA in (getattr(error, "code", None),
                                                                    getattr(error, "type", None)):
            raise EndpointGone(f"judge endpoint {self.where}: the account's quota is used up "
                               f"({self._describe(error)})") from None

    def api(self, what: str, request: Callable[[], Any], missing_ok: bool = False) -> Any:
        """One request of the Batch API (upload, create, poll, download), retried by the client
        as a chat call is; what still fails stops the run naming ``what``. ``missing_ok``: None
        for a 404 (a batch the endpoint does not know)."""
        try:
            return request()
        except openai.NotFoundError as e:
            if missing_ok:
                return None
            raise EndpointGone(f"judge endpoint {self.where}: {what} failed ({self._describe(e)}); does it "
                               f"serve the Batch API? (judge.batch: false sends direct calls)") from None
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            self._raise_if_gone(e, what)
            raise EndpointGone(f"judge endpoint {self.where}: {what} keeps failing ({self._describe(e)})") from None
        except openai.APIStatusError as e:
            self._raise_if_gone(e, what)
            raise RaygptError(f"judge endpoint {self.where}: {what} failed ({self._describe(e)})") from None

    def redact(self, text: str) -> str:
        """``text`` (an error message the endpoint sent) with the API key blanked out."""
        return text.replace(self._secret, "<api key>") if self._secret else text

    def request_body(self, messages: list[dict], response_format: dict | None, seed: int) -> dict[str, Any]:
        """The body of a chat completion request, as a direct call sends it (a batch line's body)."""
        return self._request(messages, response_format, seed)

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

def _describe(error: Exception, secret: str | None = None) -> str:
    status = getattr(error, "status_code", None)
    kind = type(error).__name__
    message = str(getattr(error, "message", "") or error)
    if secret:
        message = message.replace(secret, "<api key>")  # before the cut, which could leave a piece of it
    message = message.splitlines()[0][:200]
    return f"{kind} {status}: {message}" if status else f"{kind}: {message}"


IDENTITY_FIELDS = ("id", "owned_by", "root", "parent", "meta")
"""What a /v1/models entry says about how a model is served: its name, the server kind (vLLM
says "vllm", Ollama "library", llama.cpp "llamacpp"), vLLM's weights path and base model,
llama.cpp's parameter count and file size. Left out: ``created`` and ``permission``, which
vLLM makes anew on every request."""


def judge_identity(config: JudgeConfig, listed: dict | None) -> str | None:
    """Who the judge is, for the cache key: ``judge.identity`` when the spec names it, "openai"
    for OpenAI itself, else what the endpoint lists about the model (``listed``, from
    ``JudgeEndpoint.preflight``); None when the endpoint lists nothing (the cache then keys by
    the address, as older caches did)."""
    if config.identity:
        return f"name:{config.identity}"
    if not config.base_url:
        return "openai"
    if listed is None:
        return None
    return "served:" + json.dumps({k: listed[k] for k in IDENTITY_FIELDS if listed.get(k) is not None},
                                  sort_keys=True, ensure_ascii=False)


class JudgeCache:
    """Judge replies on disk (or S3), one JSON file per key, so no judgement is bought twice.

    Two keys may find one judgement: ``key`` (who the judge is, not where) and ``address_key``
    (the endpoint's address, as caches made before the identity keyed them). ``get`` reads the
    first and falls back to the second; an entry found only by the address is copied under the
    identity key, so from then on the identity key wins and the old file is merely kept.
    """

    def __init__(self, root: str, storage: Storage):
        self.root = root
        self.storage = storage

    @staticmethod
    def key(judge: str, model: str, template: str, messages: list[dict], settings: dict[str, Any]) -> str:
        """sha256 of everything that shapes the reply: who the judge is (``judge_identity``: one
        model name may be served differently by Ollama and vLLM), judge model, template name and
        version, the full prompt, and the sampling settings (temperature, seed, max_tokens)."""
        blob = json.dumps({"judge": judge, "model": model, "template": template,
                           "messages": messages, "settings": settings}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    @staticmethod
    def address_key(endpoint: str | None, model: str, template: str, messages: list[dict],
                    settings: dict[str, Any]) -> str:
        """The key of caches made before ``key``: the endpoint's address in place of the judge's
        identity. Still read; written only where the endpoint says nothing about its models."""
        blob = json.dumps({"endpoint": endpoint or "openai", "model": model, "template": template,
                           "messages": messages, "settings": settings}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> str:
        return join(self.root, key[:2], f"{key}.json")

    def get(self, key: str, fallback: str | None = None, copy_forward: bool = True) -> dict | None:
        """The entry cached under ``key``, else under ``fallback`` (then copied under ``key``
        unless ``copy_forward`` is False); None when absent or unreadable (a torn file is
        re-judged)."""
        entry = self._read(key)
        if entry is None and fallback is not None and fallback != key:
            entry = self._read(fallback)
            if entry is not None and copy_forward:
                self.storage.write_json(self.path(key), {**entry, "key": key, "address_key": fallback})
        return entry

    def _read(self, key: str) -> dict | None:
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

    # -- who answers at an address --------------------------------------------------------------

    def _identity_path(self, base_url: str, model: str) -> str:
        digest = hashlib.sha256(json.dumps([base_url, model]).encode()).hexdigest()
        return join(self.root, "judges", f"{digest[:24]}.json")

    def remembered_identity(self, base_url: str, model: str) -> tuple[bool, str | None]:
        """(known, identity) of the judge last found at ``base_url`` serving ``model``: so a
        re-run needs no request to know whose judgements to read."""
        uri = self._identity_path(base_url, model)
        if not self.storage.exists(uri):
            return False, None
        try:
            entry = json.loads(self.storage.read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False, None
        if not isinstance(entry, dict) or "identity" not in entry:
            return False, None
        return True, entry["identity"]

    def remember_identity(self, base_url: str, model: str, identity: str | None, listed: dict | None) -> None:
        self.storage.write_json(self._identity_path(base_url, model),
                                {"base_url": without_userinfo(base_url), "model": model, "identity": identity,
                                 "listed": listed, "created": time.time()})
