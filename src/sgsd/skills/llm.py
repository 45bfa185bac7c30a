"""LLM clients for building and updating skill banks: one protocol, two implementations.

- `OpenAIClient`: any OpenAI-compatible chat-completions endpoint (a vLLM server, a hosted API),
  over plain `httpx`; prompts are sent concurrently (the server batches them).
- `HFClient`: a local Hugging Face model and tokenizer (e.g. the policy being trained, shared as the
  updater), batched `generate` through `sgsd.generation.HFGenerator`.

Each prompt is one user turn; each reply is the assistant's text (thinking blocks included when the
model writes them: the JSON scanner removes them). After `complete`, both clients say in
`last_truncated` ([bool] per prompt) which replies were cut by `max_tokens`, the usual cause of a
reply that does not parse.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sgsd.errors import UserError
from sgsd.generation import HFGenerator, SamplingConfig
from sgsd.prompts import ChatStyle, render_chat
from sgsd.redact import redact_text, redact_url, split_credentials, url_secrets

if TYPE_CHECKING:
    import httpx
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")


class LLMError(UserError):
    """The LLM endpoint failed (unreachable, HTTP error, malformed reply) after retries."""


class LLMClient(Protocol):
    name: str

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        """One reply per prompt, in order."""


class OpenAIClient:
    """POST {base_url}/v1/chat/completions, one request per prompt, up to `concurrency` at a time.

    base_url: e.g. "http://127.0.0.1:8000" or "http://127.0.0.1:8000/v1". api_key: sent as a Bearer
    token when given. A user name and password in the URL (`http://USER:PASSWORD@host/`) are taken
    out of it and sent as HTTP basic authentication when no api_key is given (with one, the key is
    sent, as the only Authorization a request can carry); the URL in `name` and in every error is
    shown with them as `***` (`sgsd.redact`), as are query values. extra_body: merged into every
    request (e.g. {"chat_template_kwargs": {"enable_thinking": False}} for Qwen3 on vLLM, or "top_p").
    Transient failures (connection errors, HTTP 429 and 5xx) are retried `retries` times with
    exponential back-off from `backoff_s`; anything else raises `LLMError` at once.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 concurrency: int = 16, retries: int = 3, backoff_s: float = 1.0, extra_body: dict[str, Any] | None = None):
        import httpx

        given = urlsplit(base_url.strip())
        root_path = given.path.rstrip("/")
        api_path = (root_path if root_path.endswith("/v1") else root_path + "/v1") + "/chat/completions"
        # the URL requests go to, without user name and password; shown with them as *** (they were given)
        self.url, username, password = split_credentials(urlunsplit(given._replace(path=api_path)))
        self.shown_url = redact_url(urlunsplit(given._replace(path=api_path)))
        self._secrets = (*url_secrets(base_url), api_key)
        try:
            httpx.URL(self.url)
        except httpx.InvalidURL as err:
            raise LLMError(f"LLM server URL {redact_url(base_url)}: invalid ({self._scrub(str(err))})") from None
        self.model = model
        self.name = f"openai:{model}@{redact_url(urlunsplit(given._replace(path=root_path)))}"
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.backoff_s = backoff_s
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        auth = httpx.BasicAuth(username or "", password or "") if not api_key and (username or password) else None
        self._http = httpx.Client(timeout=timeout_s, headers=headers, auth=auth)
        self._httpx = httpx

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        self.last_truncated: list[bool] = []
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            replies = list(pool.map(lambda p: self._one(p, max_tokens, temperature), prompts))
        self.last_truncated = [truncated for _, truncated in replies]
        return [text for text, _ in replies]

    def _one(self, prompt: str, max_tokens: int, temperature: float) -> tuple[str, bool]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": temperature, **self.extra_body}
        for attempt in range(self.retries + 1):
            try:
                response = self._http.post(self.url, json=body)
            except self._httpx.TransportError as err:
                problem = f"cannot reach {self.shown_url}: {type(err).__name__}: {self._scrub(str(err))}"
            else:
                if response.status_code == 200:
                    return _reply_text(response, self.shown_url, self._scrub)
                problem = f"{self.shown_url} answered HTTP {response.status_code}: {self._scrub(response.text[:200])!r}"
                if response.status_code != 429 and response.status_code < 500:
                    raise LLMError(problem)
            if attempt < self.retries:
                time.sleep(min(self.backoff_s * 2.0 ** attempt, 30.0))
        raise LLMError(f"{problem} (after {self.retries + 1} attempts)")

    def _scrub(self, text: str) -> str:
        """Text from the server or the HTTP library, without this client's credentials."""
        return redact_text(text, self._secrets)

    def close(self) -> None:
        self._http.close()


def _reply_text(response: httpx.Response, url: str, scrub: Callable[[str], str]) -> tuple[str, bool]:
    """(the reply's text, whether the server stopped it at max_tokens)."""
    try:
        choice = response.json()["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError(f"{url}: reply is not a chat completion: {scrub(response.text[:200])!r}") from None
    content = message.get("content") or ""
    # vLLM's reasoning parsers put the thinking in a separate field; keep it in front, as the model wrote it.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    text = f"<think>{reasoning}</think>{content}" if reasoning else content
    return text, choice.get("finish_reason") == "length"


class HFClient:
    """A local causal LM: prompts rendered with the tokenizer's chat template, batched generate.

    temperature 0 is greedy. The model is used as it is (no copy): pass the training policy to
    share it as the updater; generation runs under no_grad and leaves the model in eval mode.
    """

    def __init__(self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, *, name: str = "hf",
                 batch_size: int = 8,
                 chat_style: ChatStyle = ChatStyle(), top_p: float = 1.0, seed: int = 0):
        self.name = name
        self.tokenizer = tokenizer
        self.chat_style = chat_style
        self.top_p = top_p
        self.seed = seed
        self._calls = 0
        self._generator = HFGenerator(model, tokenizer, batch_size=batch_size)

    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        self.last_truncated: list[bool] = []
        if not prompts:
            return []
        rendered = [render_chat(self.tokenizer, p, self.chat_style) for p in prompts]
        # A new seed per call: repeated calls sample afresh, a rerun of the same sequence repeats.
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=self.top_p,
                                  seed=self.seed + self._calls)
        self._calls += 1
        completions = [c[0] for c in self._generator.generate(rendered, 1, sampling)]  # the model's mode is kept
        self.last_truncated = [c.truncated for c in completions]
        return [c.text for c in completions]


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]
