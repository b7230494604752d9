"""What the server backends share: a fault-tolerant JSON-over-HTTP client and client-side
tokenization.

`HTTPClient` sends each request to the next server URL in turn (round-robin), retries
transport failures (refused or dropped connections, timeouts), retryable statuses (408, 429,
5xx) and malformed replies with exponential backoff and jitter, and runs at most
``concurrency`` requests at once. After ``max_retries`` retries it raises `BackendError`
naming the server. A 4xx other than 408/429 means the request itself is wrong: it is not
retried. ``timeout_s`` bounds the connect and every read: a non-streaming batch sends nothing
until it is done, so set it above the slowest batch (a timed-out batch is sent again).
``deadline_s`` bounds the whole request, however slowly the reply trickles in (a watchdog shuts
the socket; retried like a timeout), and a reply over ``max_reply_bytes`` is not read (not
retried: the same request gets the same reply). Credentials in a URL are sent as HTTP Basic
authentication and shown as ``***`` everywhere (`ssrengine.core.urls`).

A reply is checked before anything of it is stored (`check_token_ids`, `check_logprob`):
token ids inside the vocabulary, at most max_new_tokens (+ the stop token) of them, logprobs
finite and <= 0; a reply that fails is malformed (retried, then one line naming the server and
the field). Standard library only (http.client + a thread pool), so the CPU install stays small.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import itertools
import json
import logging
import math
import random
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ssrengine.core.config import ModelConfig
from ssrengine.core.errors import InputError
from ssrengine.core.urls import redact
from ssrengine.data.records import encode_prompt
from ssrengine.generation.base import BackendError, Request, eos_ids
from ssrengine.models.fetch import resolve_model_path
from ssrengine.models.loading import load_tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

RETRY_STATUS = frozenset({408, 425, 429})  # plus every 5xx
BACKOFF_S = 1.0  # first retry delay; doubled per retry, with jitter, up to MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
READ_CHUNK = 1 << 20
# A logprob a hair above 0 is float rounding of a certain token, not a broken server.
LOGPROB_SLACK = 1e-5


class MalformedReply(ValueError):
    """A reply that is not the documented shape; retried like a transport failure."""


class _RetryableStatus(Exception):
    pass


class DeadlineExceeded(TimeoutError):
    """The whole request took longer than ``deadline_s`` (retried like a timeout)."""


class ReplyTooLarge(Exception):
    """The reply is larger than ``max_reply_bytes`` (not retried)."""


def check_token_ids(ids: Sequence[int], *, vocab_size: int, limit: int, field: str) -> None:
    """Generated ids a stage may store: inside the vocabulary, at most ``limit`` of them."""
    if len(ids) > limit:
        raise MalformedReply(f"field {field!r}: {len(ids)} tokens, more than the {limit} asked for")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise MalformedReply(
            f"field {field!r}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})"
        )


def check_logprob(value: Any, *, field: str) -> float:
    """A log-probability a judge may use: a finite number <= 0."""
    lp = float(value)
    if not (math.isfinite(lp) and lp <= LOGPROB_SLACK):
        raise MalformedReply(f"field {field!r}: {lp!r} is not a log-probability (finite, <= 0)")
    return lp


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """``"http://a:30000,http://b:30000"`` (or a list) → base URLs without trailing slashes."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for u in (x.strip().rstrip("/") for x in items):
        if not u:
            continue
        try:
            parts = urllib.parse.urlsplit(u)
            parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"not an http(s) URL: {redact(u)!r}", field="generation.url")
        out.append(u)
    return out


def _describe(e: BaseException, timeout_s: float, deadline_s: float) -> str:
    if isinstance(e, DeadlineExceeded):
        return f"no complete reply within generation.deadline_s={deadline_s:g}s"
    if isinstance(e, TimeoutError):
        return f"no reply within {timeout_s:g}s (timeout)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return f"connection dropped by the server ({type(e).__name__})"
    if isinstance(e, MalformedReply):
        return f"malformed reply: {e}"
    return f"{type(e).__name__}: {e}"


def _snippet(body: bytes, n: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


class HTTPClient:
    """JSON requests to one or more servers with retries, timeouts and bounded concurrency."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        timeout_s: float,
        max_retries: int,
        concurrency: int,
        deadline_s: float = 600.0,
        max_reply_bytes: int = 64 << 20,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.urls = parse_urls(urls)
        if not self.urls:
            raise InputError("no server URL given", field="generation.url")
        self.shown = [redact(u) for u in self.urls]  # what logs and errors name
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.max_reply_bytes = max_reply_bytes
        self.max_retries = max(0, max_retries)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._next = itertools.count()
        self._lock = threading.Lock()
        # Set when a call of `map` failed: its other calls stop retrying, so no stray request
        # reaches a server after the error was raised (e.g. one restarted for the resume).
        self._abort = threading.Event()
        # The pool size is the bound on requests in flight, across every call to `map`.
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, concurrency), thread_name_prefix="ssrengine-http"
        )

    @property
    def name(self) -> str:
        return ", ".join(self.shown)

    def _first_url(self) -> int:
        with self._lock:
            return next(self._next)

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with jitter, so clients that failed together do not retry together.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _send(self, url: str, method: str, path: str, payload: Any) -> tuple[int, bytes]:
        """One attempt: (status, body). A watchdog shuts the socket at the deadline, so no
        read, however slowly the server trickles bytes, outlives it."""
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=min(self.timeout_s, self.deadline_s))
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(self.deadline_s, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if expired.is_set():  # the deadline passed while connecting
                raise DeadlineExceeded
            body = None if payload is None else json.dumps(payload).encode()
            conn.request(method, parts.path + path, body=body, headers=self._headers(parts))
            resp = conn.getresponse()
            return resp.status, self._read(resp, expired)
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise DeadlineExceeded from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def _headers(self, parts: urllib.parse.SplitResult) -> dict[str, str]:
        """The request headers; credentials in the URL become HTTP Basic authentication
        (unless an Authorization header is set already, as the openai API key is)."""
        if parts.username is None or "Authorization" in self.headers:
            return self.headers
        user = urllib.parse.unquote(parts.username)
        secret = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        return {**self.headers, "Authorization": f"Basic {token}"}

    def _read(self, resp: http.client.HTTPResponse, expired: threading.Event) -> bytes:
        """The body, at most ``max_reply_bytes``: a longer one is not read further."""
        cap = self.max_reply_bytes
        declared = resp.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > cap:
            raise ReplyTooLarge(f"it announces {int(declared)} bytes")
        chunks, n = [], 0
        while chunk := resp.read(min(READ_CHUNK, cap + 1 - n)):
            n += len(chunk)
            if n > cap:
                raise ReplyTooLarge(f"more than {cap} bytes arrived")
            chunks.append(chunk)
        if expired.is_set():
            raise DeadlineExceeded
        return b"".join(chunks)

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        parse: Callable[[Any], T] = lambda obj: obj,
    ) -> T:
        """Send one request (to the next server) and return ``parse(reply JSON)``, retrying.

        ``parse`` validates the reply; a KeyError/TypeError/ValueError from it counts as a
        malformed reply and is retried."""
        attempts = self.max_retries + 1
        shown, error = self.shown[0], ""
        # Requests take turns over the servers; a retry goes to the server after the one that
        # failed, so one dead server among several costs a retry, never the request.
        first = self._first_url()
        for attempt in range(attempts):
            i = (first + attempt) % len(self.urls)
            url, shown = self.urls[i], self.shown[i]
            if self._abort.is_set():
                raise BackendError(
                    f"{method} {path} abandoned: another request failed", server=shown
                )
            try:
                try:
                    status, body = self._send(url, method, path, payload)
                except ReplyTooLarge as e:
                    raise BackendError(
                        f"{method} {path}: reply larger than generation.max_reply_bytes="
                        f"{self.max_reply_bytes} ({e}); not read further and not retried: lower "
                        "generation.batch_size or raise generation.max_reply_bytes",
                        server=shown,
                    ) from None
                if status >= 500 or status in RETRY_STATUS:
                    raise _RetryableStatus(f"HTTP {status}: {_snippet(body)}")
                if status >= 400:
                    raise BackendError(
                        f"{method} {path} was rejected with HTTP {status} (not retried): "
                        f"{redact(_snippet(body))}",
                        server=shown,
                    )
                try:
                    obj = json.loads(body)
                except ValueError:
                    raise MalformedReply(f"not JSON: {_snippet(body, 80)!r}") from None
                try:
                    return parse(obj)
                except MalformedReply:
                    raise
                except (KeyError, TypeError, ValueError, IndexError) as e:
                    raise MalformedReply(f"{type(e).__name__}: {e}") from None
            except (OSError, http.client.HTTPException, MalformedReply, _RetryableStatus) as e:
                error = (
                    str(e)
                    if isinstance(e, _RetryableStatus)
                    else _describe(e, self.timeout_s, self.deadline_s)
                )
                error = redact(error)
                if attempt + 1 < attempts:
                    wait = self._delay(attempt)
                    log.warning(
                        "%s %s%s: %s; retry %d/%d in %.1fs",
                        method,
                        shown,
                        path,
                        error,
                        attempt + 1,
                        self.max_retries,
                        wait,
                    )
                    self._abort.wait(wait)
        tried = f" (servers tried in turn: {self.name})" if len(self.urls) > 1 else ""
        raise BackendError(
            f"{method} {path} failed after {attempts} attempt(s){tried}; last error: {error}",
            server=shown,
        )

    def map(self, fn: Callable[[U], T], items: Iterable[U]) -> list[T]:
        """``[fn(x) for x in items]`` with at most ``concurrency`` calls running at once, in order.

        On the first failure, calls not yet started are cancelled and the error is raised."""
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            self._abort.set()
            for f in futures:
                f.cancel()
            # Running calls stop at their next attempt; wait so none outlives this error.
            concurrent.futures.wait(futures)
            self._abort.clear()
            raise

    def close(self) -> None:
        self._abort.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class PromptEncoder:
    """Client-side tokenization for the backends that do not run transformers here: chat
    messages are rendered with the model's own chat template, exactly as the hf backend does,
    and sent as token ids, so every backend sees the same prompt tokens."""

    def __init__(
        self, model: str, *, trust_remote_code: bool, tokenizer: Any = None, chat_template: str = ""
    ) -> None:
        self.tokenizer = tokenizer or load_tokenizer(
            model, trust_remote_code=trust_remote_code, chat_template=chat_template
        )
        config = _model_config(model)
        self.eos_ids = eos_ids(self.tokenizer, config.get("eos_token_id"))
        # Generated ids may reach the model's embedding rows past the tokenizer's last id.
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        rows = config.get("vocab_size") or text.get("vocab_size") or 0
        self.vocab_size = max(len(self.tokenizer), rows if isinstance(rows, int) else 0)
        # Replies are parsed on the pool's threads; a fast tokenizer shared across threads can
        # fail with "Already borrowed" (huggingface/tokenizers#537).
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, name: str, model: ModelConfig, tokenizer: Any = None) -> PromptEncoder:
        """The encoder of model ``name`` under ``model``'s trust and chat-template settings."""
        return cls(
            name,
            trust_remote_code=model.trust_remote_code,
            tokenizer=tokenizer,
            chat_template=model.chat_template,
        )

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def token_id(self, text: str) -> int:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]

    def prompt_ids(self, requests: Sequence[Request]) -> list[list[int]]:
        return [
            list(r.input_ids) if r.input_ids is not None else self.tokenize(r.messages or [])
            for r in requests
        ]

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_strings(self, t: int) -> tuple[str, str]:
        """Token ``t`` decoded, and as its vocabulary entry."""
        with self._lock:
            return self.tokenizer.decode([t]), self.tokenizer.convert_ids_to_tokens(t)


def _model_config(model: str) -> dict[str, Any]:
    """The model directory's generation_config.json merged over its config.json (where
    transformers takes ``eos_token_id`` from); {} without either."""
    try:
        path = Path(resolve_model_path(model))
    except InputError:
        return {}
    out: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            obj = json.loads((path / name).read_text())
            out.update(
                {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else {}
            )
    return out
