"""Reference edit hook: the rule of method.md 3.4 / 4, one row, one position, one head at a time.

Deliberately slow and explicit, written from the specification and not from otguard's batched hook:
for every batch row ``i``, every position ``t`` of the forward call and every head ``h`` of an edited
layer it computes, in float64,

    p_h = sigmoid(theta_h . a_h + theta0_h),    vote_h = p_h > 0.5,
    flag = sum_h vote_h >= tau                  (always True when tau is None),

and, if the row is flagged and the position is in scope, edits head ``h``:

- ``"replace"`` (RADIANT), heads with vote_h and in the mask:  a_h <- A_h a_h + b_h
- ``"kappa-p"`` (SLIM),    heads with vote_h and in the mask:  a_h <- a_h + kappa p_h (A_h a_h + b_h - a_h)
- ``"shift"`` (ITI),       heads in the mask:                  a_h <- a_h + b_h

(``A is None`` means the identity, so ``replace`` is then a shift too.) Scopes, on absolute positions
(``past length + t``): ``"generation"`` edits positions ``>= prompt_len - 1``; ``"answer"`` edits
positions ``>= start[i]`` (no edit before :meth:`ExplicitPolicy.set_answer_start`); ``"all"`` edits
every position.

Detector record: for every in-scope (call, row, position, layer) it logs the vote count, the layer's
flag, the edited heads and how many of them the head's own probe calls desirable (logit < 0) after
the edit, and after the full map ``A a + b`` (:attr:`ExplicitPolicy.log`). ``mode="monitor"``
computes all of it but returns the activations unchanged.

The past length is read from the cache the model is called with (0 without one), whatever the call
names it: ``cache=`` (transformers' ``generate`` since the 5.2x rename), ``past_key_values=`` or a
positional argument; the prompt length is the length of the first forward call after
:meth:`ExplicitPolicy.reset` (or set explicitly), so call ``reset()`` before each ``generate``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from otguard.sites import find_head_sites


class ExplicitPolicy:
    """Attach ``policy`` to ``model`` with Python loops; a context manager like ``PolicyHandle``."""

    def __init__(
        self, policy: Any, model: Any, *, scope: str | None = None, kappa: float | None = None,
        mode: str = "repair",
    ) -> None:
        self.policy = policy
        self.model = model
        self.scope = scope or policy.scope
        self.kappa = float(policy.kappa if kappa is None else kappa)
        self.prompt_len: int | None = None
        self.past_len = 0
        self.answer_start: Any = None
        # Counts over in-scope (row, position) pairs, to check that a test exercises both branches.
        self.n_in_scope = 0
        self.n_flagged = 0
        self.n_edited_heads = 0
        self.mode = mode
        self.call = -1  # index of the forward call, for the log
        # (call, row, position, layer) -> dict(votes, flagged, edited, desirable, mapped_desirable)
        self.log: dict[tuple[int, int, int, int], dict[str, int]] = {}
        sites = find_head_sites(model)
        self.n_heads = sites.n_heads
        self._handles = [model.register_forward_pre_hook(self._top_hook, with_kwargs=True)]
        for edit in policy.layers:
            module = sites.modules[edit.layer]
            self._handles.append(module.register_forward_pre_hook(self._make_hook(edit)))

    # ----------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        self.prompt_len = None
        self.past_len = 0

    def set_prompt_length(self, n: int) -> None:
        self.prompt_len = int(n)

    def set_answer_start(self, start: Any) -> None:
        self.answer_start = start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ExplicitPolicy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def n_flagged_positions(self) -> int:
        """(call, row, position) triples flagged on at least one edited layer."""
        return len({key[:3] for key, entry in self.log.items() if entry["flagged"]})

    def _top_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.call += 1
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        length = ids.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            names = [n for n in inspect.signature(type(module).forward).parameters if n != "self"]
            for name in ("cache", "past_key_values"):
                if name in names and names.index(name) < len(args):
                    cache = args[names.index(name)]
        self.past_len = int(cache.get_seq_length()) if cache is not None else 0
        if self.prompt_len is None:
            self.prompt_len = self.past_len + length

    def _in_scope(self, row: int, position: int) -> bool:
        if self.scope == "all":
            return True
        if self.scope == "generation":
            return position >= self.prompt_len - 1
        if self.answer_start is None:
            return False
        start = self.answer_start
        if torch.is_tensor(start):
            start = start.reshape(-1)
            start = start[row] if start.numel() > 1 else start[0]
            start = int(start)
        return position >= int(start)

    # ----------------------------------------------------------------- the rule
    def _make_hook(self, edit: Any) -> Any:
        layer_index = [e.layer for e in self.policy.layers].index(edit.layer)
        rule, kappa, n_heads = self.policy.rule, self.kappa, self.n_heads
        weight = edit.probe_weight.double()
        bias = edit.probe_bias.double()
        mask = edit.head_mask.bool()
        b = edit.b.double()
        A = edit.A.double() if edit.A is not None else None

        def hook(module: Any, args: tuple) -> tuple:
            x = args[0]
            out = x.clone()
            batch, length = x.shape[0], x.shape[1]
            for i in range(batch):
                for t in range(length):
                    position = self.past_len + t
                    if not self._in_scope(i, position):
                        continue
                    self.n_in_scope += 1
                    heads = x[i, t].double().cpu().reshape(n_heads, -1)  # float64 on the host
                    probs = []
                    votes = []
                    for h in range(n_heads):
                        z = float(torch.dot(weight[h], heads[h]) + bias[h])
                        p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
                        probs.append(p)
                        votes.append(p > 0.5)
                    flagged = True if edit.threshold is None else sum(votes) >= edit.threshold
                    entry = {"votes": sum(votes), "flagged": int(flagged), "edited": 0, "desirable": 0,
                             "mapped_desirable": 0}  # fmt: skip
                    self.log[(self.call, i, position, layer_index)] = entry
                    if not flagged:
                        continue
                    self.n_flagged += 1
                    new = heads.clone()
                    for h in range(n_heads):
                        if not bool(mask[h]):
                            continue
                        a = heads[h]
                        if rule == "shift":
                            new[h] = mapped = a + b[h]
                        else:
                            if not votes[h]:
                                continue
                            mapped = (A[h] @ a if A is not None else a) + b[h]
                            if rule == "replace":
                                new[h] = mapped
                            else:  # kappa-p
                                new[h] = a + kappa * probs[h] * (mapped - a)
                        self.n_edited_heads += 1
                        entry["edited"] += 1
                        entry["desirable"] += int(float(torch.dot(weight[h], new[h]) + bias[h]) < 0)
                        entry["mapped_desirable"] += int(float(torch.dot(weight[h], mapped) + bias[h]) < 0)
                    if self.mode == "repair":
                        out[i, t] = new.reshape(-1).to(device=x.device, dtype=x.dtype)
            return (out, *args[1:])

        return hook
