"""The generation engine behind ``otguard serve``: a queue, a batching worker thread and a decoding loop.

Requests arrive from the event loop (:meth:`Engine.submit`) and wait in a queue. One worker thread
owns the model: it waits a short window after the oldest waiting request (``batch_window_s``) for
others to arrive, then runs every waiting request with the same policy and mode (up to
``max_batch_size``) as one left-padded batch. A policy is attached per forward (the hook gates each
row, but all rows of a forward share one policy and one mode), so requests for other policies wait
for the next batch; sampling settings are per row (temperature, top-p, stop strings, maximum
length and a seeded ``torch.Generator`` each), so they do not split a batch.

The loop is :func:`otguard.decoding.decode`'s (left padding seen through by position ids, finished
rows dropped from the batch and its KV cache), extended with what a server needs: per-row sampling,
text streamed as it is produced (holding back the characters that could start a stop string), and
one host read per step that carries the next tokens together with the detector's per-row flags.
A batch always runs to its end; a cancelled request (a client that went away) leaves the batch at
the next step.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from otguard.decoding import accepts_argument, cache_kwarg, eos_ids, output_cache
from otguard.models import context_length
from otguard.serve.schemas import APIError, Sampling

logger = logging.getLogger(__name__)

OFF = "off"  # the mode of a request without a policy


# ---------------------------------------------------------------- events sent back to a request
@dataclass
class Delta:
    """New text of a streaming request."""

    text: str


@dataclass
class Result:
    """The whole answer to one request."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    flags: list[bool] | None  # per generated token: produced from a flagged position (None: no policy)
    token_ends: list[int]  # character offset in ``text`` where each generated token ends
    batch_size: int
    queued_s: float

    def spans(self) -> list[dict[str, Any]]:
        """Runs of consecutive flagged tokens, as token and character offsets of the returned text."""
        if not self.flags:
            return []
        out: list[dict[str, Any]] = []
        start = None
        for i, flag in enumerate([*self.flags, False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                c0 = self.token_ends[start - 1] if start else 0
                c1 = self.token_ends[i - 1]
                out.append(
                    {
                        "start_token": start,
                        "end_token": i,
                        "start_char": c0,
                        "end_char": c1,
                        "text": self.text[c0:c1],
                    }
                )
                start = None
        return out

    def summary(self, policy: str | None, mode: str) -> dict[str, Any]:
        """The ``otguard`` object of a response: what the detector saw in this answer."""
        if policy is None:
            return {"policy": None, "mode": OFF}
        flags = self.flags or []
        n_flagged = sum(flags)
        return {
            "policy": policy,
            "mode": mode,
            "flag_rate": n_flagged / len(flags) if flags else 0.0,
            "flagged": n_flagged > 0,
            "flagged_tokens": n_flagged,
            "checked_tokens": len(flags),
            "spans": self.spans(),
        }


@dataclass
class Failed:
    """The batch of this request failed (logged on the server)."""

    message: str


Event = Delta | Result | Failed


@dataclass
class Job:
    """One request in the engine: token ids, the policy and mode, decoding settings, a callback."""

    prompt_ids: list[int]
    policy: str | None
    mode: str  # OFF, "repair" or "monitor"
    sampling: Sampling  # max_tokens resolved (an int)
    emit: Callable[[Event], None]  # called from the worker thread; must be thread-safe
    stream: bool = False
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.policy, self.mode)


class _Row:
    """Decoding state of one request inside a running batch."""

    def __init__(self, job: Job, generator: torch.Generator | None, batch_size: int) -> None:
        self.job = job
        self.generator = generator
        self.batch_size = batch_size  # rows in the batch when this one entered it
        self.started = time.perf_counter()
        self.done = False
        self.tokens: list[int] = []
        self.flags: list[bool] = []
        self.token_ends: list[int] = []
        self.sent = 0  # characters already streamed
        self.text = ""
        self.finish: str | None = None


# ---------------------------------------------------------------- flags of the current positions
def _row_flags(handle: Any, batch: int) -> torch.Tensor | None:
    """Whether any hooked layer flagged each row at the last position of the forward call that just ran
    (a device tensor ``(batch,)``, no host sync); None without a policy."""
    return None if handle is None else handle.last_call_flags(batch)


class Engine:
    """Owns the model; batches and runs requests on one worker thread (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        policies: dict[str, Any] | None = None,
        *,
        max_batch_size: int = 16,
        batch_window_s: float = 0.01,
        max_queue: int = 256,
        max_tokens_cap: int = 512,
        check_weights: bool = True,
        join: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        if not accepts_argument(model, "position_ids"):
            raise TypeError(
                f"{type(model).__name__}.forward takes no position_ids, which batching with left "
                "padding needs; this model cannot be served by otguard serve."
            )
        self.model, self.tokenizer = model, tokenizer
        self.request_tokenizer = copy.deepcopy(tokenizer)  # for the request threads (not thread-safe)
        self.policies = dict(policies or {})
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_queue, self.max_tokens_cap = max_queue, max_tokens_cap
        self.check_weights, self.join = check_weights, join
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.eos = set(eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache_name = cache_kwarg(model)
        self._keep_kw = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0  # requests in the running batch
        self._in_batch = False  # a batch is running (until its policy is detached from the model)
        self._thread: threading.Thread | None = None
        self.on_batch: Callable[[int, str | None, str], None] | None = None  # (size, policy, mode)
        self.on_join: Callable[[int, str | None, str], None] | None = None  # (joiners, policy, mode)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="otguard-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, and join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is queued and no batch runs; returns False on ``timeout``.

        A request's answer is sent the moment its last token is decided, a moment *before* its batch
        detaches the policy from the model: code that uses the same model object in this process (a
        reference computation, an evaluation between requests) waits here first, or it could run with
        the server's policy still attached.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._in_batch, timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._busy

    # ------------------------------------------------------------------ requests
    def encode_prompt(
        self, prompt: str | list[int] | None, messages: list[dict[str, Any]] | None
    ) -> list[int]:
        """Token ids of a completion prompt or of chat messages through the tokenizer's chat template."""
        tok = self.request_tokenizer
        if messages is not None:
            if not getattr(tok, "chat_template", None):
                raise APIError(
                    400, "This model's tokenizer has no chat template; use /v1/completions.", param="messages"
                )
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template that rejects these messages (roles, order)
                raise APIError(
                    400, f"The chat template rejected these messages: {exc}", param="messages"
                ) from exc
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, list):
            vocab = len(tok)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400, f"Token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1}).", param="prompt"
                )
            return list(prompt)
        assert prompt is not None
        return list(tok(prompt)["input_ids"])

    def resolve_sampling(self, sampling: Sampling, n_prompt: int) -> Sampling:
        """Fill in ``max_tokens`` and check that prompt + answer fit in the model's context."""
        room = None if self.context is None else self.context - n_prompt
        if room is not None and room <= 0:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{n_prompt}. Shorten the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens_cap if room is None else min(self.max_tokens_cap, room)
        elif max_tokens > self.max_tokens_cap:
            raise APIError(
                400,
                f"max_tokens is at most {self.max_tokens_cap} on this server (--max-tokens); "
                f"got {max_tokens}.",
                param="max_tokens",
            )
        elif room is not None and max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{n_prompt} and max_tokens asks for {max_tokens} more. Shorten the prompt or "
                "lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return Sampling(max_tokens, sampling.temperature, sampling.top_p, sampling.stop, sampling.seed)

    def submit(self, job: Job) -> None:
        """Queue a job; 503 while shutting down, 429 when the queue is full."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise APIError(
                    429,
                    f"Too many queued requests ({self.max_queue}); retry shortly.",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._pending.append(job)
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[Job] | None:
        """Wait for work; the oldest request's policy and mode choose the batch. None: stopped and idle."""
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return None
                deadline = self._pending[0].created + self.batch_window_s
                while len(self._pending) < self.max_batch_size and not self._stopping:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch: list[Job] = []
                rest: deque[Job] = deque()
                key = None
                for job in self._pending:
                    if job.cancelled:
                        continue
                    if key is None:
                        key = job.key
                    if job.key == key and len(batch) < self.max_batch_size:
                        batch.append(job)
                    else:
                        rest.append(job)
                self._pending = rest
                if batch:
                    self._busy = len(batch)
                    self._in_batch = True
                    return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self.run_batch(batch)
            finally:
                with self._cond:
                    self._busy = 0
                    self._in_batch = False
                    self._cond.notify_all()

    def _admit(self, key: tuple[str | None, str], room: int) -> list[Job]:
        """Waiting jobs that may join the running batch of ``key`` (up to ``room``), without waiting.

        Only while the oldest waiting job has the same policy and mode: once a request for another
        policy waits, the running batch takes no one else, finishes, and that request goes next.
        """
        with self._cond:
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            if not self._pending or self._pending[0].key != key:
                return []
            jobs: list[Job] = []
            while self._pending and len(jobs) < room:
                job = self._pending[0]
                if job.key != key and not job.cancelled:
                    break
                self._pending.popleft()
                if not job.cancelled:
                    jobs.append(job)
            self._busy += len(jobs)
            return jobs

    @torch.no_grad()
    def run_batch(self, batch: Sequence[Job]) -> None:
        """Generate every job of ``batch`` (one policy and mode), and of the jobs that join it, to its
        end, emitting events; a failure answers the unfinished jobs with :class:`Failed` (logged)."""
        policy_name, mode = batch[0].key
        if any(job.key != (policy_name, mode) for job in batch):
            raise ValueError("A batch mixes policies or modes; the hook applies one per forward.")
        policy = None if policy_name is None else self.policies[policy_name]
        if self.on_batch is not None:
            self.on_batch(len(batch), policy_name, mode)
        rows = [_Row(job, self._generator(job.sampling), len(batch)) for job in batch]
        handle = None
        try:
            handle = None if policy is None else self._attach(policy, mode)
            self._decode(rows, handle, (policy_name, mode))
        except Exception as exc:  # the server goes on; these requests get a 500
            logger.exception("A batch of %d request(s) failed", len(rows))
            for row in rows:
                if not row.done:
                    row.done = True
                    _safe_emit(row.job, Failed(f"{type(exc).__name__}: {exc}"))
        finally:
            if handle is not None:
                handle.remove()

    def _finish(self, row: _Row, with_flags: bool) -> None:
        job = row.job
        row.done = True
        result = Result(
            text=row.text,
            finish_reason=row.finish or "length",
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(row.tokens),
            flags=row.flags if with_flags else None,
            token_ends=row.token_ends,
            batch_size=row.batch_size,
            queued_s=row.started - job.created,
        )
        with self._cond:
            self._busy = max(self._busy - 1, 0)
        _safe_emit(job, result)

    def _attach(self, policy: Any, mode: str) -> Any:
        """Attach ``policy`` for one batch: edit scope "generation" (the last prompt token on)."""
        kwargs: dict[str, Any] = {"mode": "monitor"} if mode == "monitor" else {}
        return policy.attach(self.model, scope="generation", check_weights=self.check_weights, **kwargs)

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        if sampling.greedy:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        return gen

    def _prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward over the left-padded prompts of ``rows``: cache, last logits, mask, next positions."""
        B, width = len(rows), max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.job.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.job.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_name: None},
            **self._keep_kw,
        )
        return output_cache(out), out.logits[:, -1], mask, positions[:, -1] + 1

    def _step(self, rows: list[_Row], logits: torch.Tensor, handle: Any) -> tuple[torch.Tensor, list[int]]:
        """Pick each row's next token, add it (one host read); the tokens and the rows still going."""
        nxt = self._pick(logits, rows)
        flags = _row_flags(handle, len(rows))
        if flags is None:
            tokens, row_flags = nxt.tolist(), None
        else:  # one host read for the tokens and the flags
            tokens, row_flags = torch.stack([nxt, flags.to(nxt.device, torch.long)]).tolist()
        keep = []
        for j, row in enumerate(rows):
            if self._advance(row, tokens[j], None if row_flags is None else bool(row_flags[j])):
                self._finish(row, handle is not None)
            else:
                keep.append(j)
        return nxt, keep

    def _decode(self, rows: list[_Row], handle: Any, key: tuple[str | None, str]) -> None:
        """Run ``rows`` to their ends; waiting jobs of the same ``key`` join at step boundaries
        (appended to ``rows``) while there is room and the cache can be merged."""
        cache, logits, mask, next_pos = self._prefill(rows)
        alive = list(rows)
        while True:
            nxt, keep = self._step(alive, logits, handle)
            if len(keep) < len(alive):
                if not keep:
                    return
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                alive = [alive[j] for j in keep]
            room = self.max_batch_size - len(alive)
            joiners = self._admit(key, room) if room > 0 and self.join and _mergeable(cache) else []
            if joiners:
                if self.on_join is not None:
                    self.on_join(len(joiners), *key)
                new = [_Row(job, self._generator(job.sampling), len(alive) + len(joiners)) for job in joiners]
                rows.extend(new)
                if handle is not None:
                    handle.reset()  # the joiners' prompt defines the edit scope of their prefill
                cache2, logits2, mask2, pos2 = self._prefill(new)
                nxt2, keep2 = self._step(new, logits2, handle)
                if keep2:
                    if len(keep2) < len(new):
                        sel = torch.tensor(keep2, device=self.device)
                        cache2.batch_select_indices(sel)
                        mask2, pos2, nxt2 = mask2[sel], pos2[sel], nxt2[sel]
                    cache, mask = _merge(cache, mask, cache2, mask2)
                    next_pos, nxt = torch.cat([next_pos, pos2]), torch.cat([nxt, nxt2])
                    alive += [new[j] for j in keep2]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{self._cache_name: cache},
            )
            cache, logits = output_cache(out), out.logits[:, -1]
            next_pos = next_pos + 1

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The next token of each row: argmax for greedy rows, a seeded top-p draw for the others."""
        nxt = logits.argmax(-1)
        sampled = [j for j, r in enumerate(rows) if r.generator is not None]
        if not sampled:
            return nxt
        sel = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[j].job.sampling.temperature for j in sampled], device=logits.device)
        p = torch.tensor([rows[j].job.sampling.top_p for j in sampled], device=logits.device)
        probs = torch.softmax(logits[sel].float() / temps[:, None], dim=-1)
        if bool((p < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass ranked above each token; the top one is kept
            sorted_p = sorted_p.masked_fill(before >= p[:, None], 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        draws = [torch.multinomial(probs[k], 1, generator=rows[j].generator) for k, j in enumerate(sampled)]
        return nxt.index_put((sel,), torch.cat(draws))

    def _advance(self, row: _Row, token: int, flag: bool | None) -> bool:
        """Add one token to a row, stream what is safe to show; True when the row has finished."""
        job, sampling = row.job, row.job.sampling
        row.tokens.append(token)
        if flag is not None:
            row.flags.append(flag)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        row.token_ends.append(max(len(text.rstrip("\ufffd")), row.token_ends[-1] if row.token_ends else 0))
        finish = None
        if token in self.eos:
            finish = "stop"
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and (len(row.tokens) >= (sampling.max_tokens or 0) or job.cancelled):
            finish = "length"
        row.text = text
        row.finish = finish
        if finish is not None:
            row.token_ends = [min(e, len(text)) for e in row.token_ends]
            safe = len(text)
        else:
            safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character waits for its next byte
            safe -= _held_back(text[:safe], sampling.stop)
        if job.stream and safe > row.sent:
            _safe_emit(job, Delta(text[row.sent : safe]))
            row.sent = safe
        return finish is not None


def _mergeable(cache: Any) -> bool:
    """Whether rows of another prefill can be merged into ``cache`` (plain dynamic layers only)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return (
        bool(layers)
        and not getattr(cache, "offloading", False)
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
    )


def _merge(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Rows of ``other`` appended to ``cache`` (in place), both left-padded to the longer length.

    The padding is masked out (zeros in the attention mask) and every row keeps its own position
    ids, so a joined row computes what it would alone (up to floating-point rounding).
    """
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    for layer, extra in zip(cache.layers, other.layers, strict=True):
        layer.keys = torch.cat([pad(layer.keys, -2), pad(extra.keys, -2)], 0)
        layer.values = torch.cat([pad(layer.values, -2), pad(extra.values, -2)], 0)
    return cache, torch.cat([pad(mask, 1), pad(other_mask, 1)], 0)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _safe_emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # the request's loop is gone (client left, server stopping): nothing to tell
        logger.debug("Dropped an event for a request that is gone", exc_info=True)
