"""The runtime side of an attached policy: the forward pre-hooks and their handle.

:meth:`otguard.policy.Policy.attach` builds a :class:`PolicyHandle`. A top-level pre-hook on the
model tracks which absolute positions each forward call covers (from the KV cache the call is
given, under whichever name or position the model takes it: transformers' ``generate`` passes it as
``cache=`` since the 5.2x rename, older code as ``past_key_values=``); one pre-hook per edited
layer, on the output projection (the per-head site, see :mod:`otguard.sites`), probes the heads and
applies ``a + w_h * ((A - I) a + b)`` to the positions in scope: one product for the probe logits,
a vote, one batched affine edit, no Python loop over heads or tokens, no host sync and no tensor
built per call.

The probe logits, the vote and the edit are computed in float32 (float64 for a float64 model) on
the in-scope slice of the activations, whatever the model's dtype, and the result is cast back once:
the thresholds were set on float32 probe logits, and in bf16 a vote near the threshold can flip
and ``(A - I) a`` can lose most of its digits when ``A`` is large. That is ``H * d`` values per
edited token, a small copy next to the attention itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from otguard.decoding import CACHE_NAMES, cache_arg_index
from otguard.errors import PolicyError
from otguard.sites import HeadSites

if TYPE_CHECKING:
    from otguard.policy import LayerEdit, Policy


class _HookState:
    """Host-side bookkeeping shared by the hooks of one handle (plain ints: no device sync)."""

    def __init__(self) -> None:
        self.past_len = 0
        self.prompt_len: int | None = None
        self.answer_start: torch.Tensor | int | None = None


class PolicyHandle:
    """Live hooks of an attached policy. ``remove()`` (or leaving the ``with`` block) detaches.

    Diagnostics accumulate on the device without syncing; :meth:`stats` reads them.
    """

    def __init__(self, policy: Policy, model: Any, sites: HeadSites, scope: str, kappa: float) -> None:
        self.policy, self.model, self.scope, self.kappa = policy, model, scope, kappa
        self.state = _HookState()
        self._handles: list[Any] = []
        self._counters: dict[int, torch.Tensor] = {}
        self._host_counters: dict[int, list[int]] = {}
        self._orig_generate = None
        self._own_generate = False
        try:
            self._handles.append(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
            for edit in policy.layers:
                module = sites.modules[edit.layer]
                hook = _make_edit_hook(edit, module, policy.rule, kappa, sites.n_heads, self)
                self._handles.append(module.register_forward_pre_hook(hook))
            if scope == "generation" and hasattr(model, "generate"):
                self._wrap_generate()
        except BaseException:
            self.remove()
            raise

    # -- sequence tracking: which absolute positions does this forward call cover?
    def _top_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        T = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
        past = _call_cache(module, args, kwargs)
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())  # a host int for every transformers cache layer
        self.state.past_len = past_len
        if self.state.prompt_len is None:
            self.state.prompt_len = past_len + T

    def _wrap_generate(self) -> None:
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            self.reset()
            self.state.prompt_len = _chunked_prompt_length(self.model, args, kwargs)
            return original(*args, **kwargs)

        self._orig_generate = original
        self._own_generate = "generate" in vars(self.model)  # another handle's wrapper (nested attach)
        self.model.generate = generate

    def reset(self) -> None:
        """Start a new sequence: the next forward call defines the prompt length."""
        self.state.prompt_len = None
        self.state.past_len = 0

    def set_prompt_length(self, n: int) -> None:
        """Declare the prompt length (scope ``"generation"`` edits positions >= n - 1)."""
        self.state.prompt_len = int(n)

    def set_answer_start(self, start: torch.Tensor | int) -> None:
        """First edited absolute position, per row ``(B,)`` or shared (scope ``"answer"``)."""
        self.state.answer_start = start

    def stats(self) -> dict[str, float]:
        """Flag rate over edited positions and mean number of edited heads per flagged position."""
        total = torch.zeros(3, dtype=torch.float64)
        for counter in self._counters.values():
            total += counter.double().cpu()
        for host_counter in self._host_counters.values():
            total += torch.tensor(host_counter, dtype=torch.float64)
        positions, flagged, heads = (float(v) for v in total)
        return {
            "positions": positions,
            "flag_rate": flagged / positions if positions else 0.0,
            "edited_heads_per_flag": heads / flagged if flagged else 0.0,
        }

    def remove(self) -> None:
        """Detach every hook and restore ``model.generate``; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._orig_generate is not None:
            if self._own_generate:
                self.model.generate = self._orig_generate
            else:
                try:
                    del self.model.generate
                except AttributeError:
                    pass
            self._orig_generate = None

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextmanager
def attached(
    policy: Policy | None, model: Any, *, scope: str | None = None, kappa: float | None = None
) -> Iterator[PolicyHandle | None]:
    """``policy.attach(model, ...)`` as a ``with`` block, or nothing at all when ``policy`` is None.

    The one idiom for code that runs with an optional policy (the ``none`` baseline is a policy of
    None): ``with attached(policy, model, scope="answer") as handle:`` yields the handle, or None.
    """
    if policy is None:
        yield None
        return
    handle = policy.attach(model, scope=scope, kappa=kappa)  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        handle.remove()


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = next(module.parameters())
    if weight.device.type != "meta":
        return weight.device, weight.dtype
    # Offloaded by accelerate (device_map with "cpu"/"disk"): the weights, and the activations the
    # hook sees, are on the execution device of the module's AlignDevicesHook.
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device), weight.dtype
    raise PolicyError(f"{type(module).__name__} has its weights on the meta device and no accelerate "
                      "execution device; load the model's weights before attaching a policy.")


def _make_edit_hook(edit: LayerEdit, module: torch.nn.Module, rule: str, kappa: float, H: int,
                    handle: PolicyHandle) -> Any:
    """Build the pre-hook of one layer; all tensors are moved to the module's device here, once, in the
    compute dtype (float32, or float64 for a float64 model).

    Per call, which positions are in scope is worked out on the host where it can be (scope
    ``"all"``, ``"generation"`` and a shared answer start: a suffix of the call's positions, the
    whole call during decoding); only that suffix is probed and edited, and a call with nothing in
    scope (the prompt tokens before the last) costs nothing. Per-row answer starts use a mask.
    """
    device, dtype = _module_device_dtype(module)
    cdtype = torch.promote_types(dtype, torch.float32)  # the gate and the edit: float32 at least
    d = int(edit.b.shape[-1])
    W = edit.probe_weight.to(device=device, dtype=cdtype)
    w0 = edit.probe_bias.to(device=device, dtype=cdtype)
    mask = edit.head_mask.to(device=device, dtype=cdtype)
    b = edit.b.to(device=device, dtype=cdtype)
    A_minus_I_T = None  # (H, e, d) = (A - I) transposed, for one bmm over heads
    if edit.A is not None and rule != "shift":
        A = edit.A.to(torch.promote_types(edit.A.dtype, cdtype))
        eye = torch.eye(A.shape[-1], dtype=A.dtype)
        A_minus_I_T = (A - eye).transpose(1, 2).contiguous().to(device=device, dtype=cdtype)
    gated = edit.threshold is not None
    probed = gated or rule != "shift"  # the probe logits are needed for the gate or the head votes
    tau = int(edit.threshold) if edit.threshold is not None else 0
    # kappa-p weight = vote * mask * kappa * p; mask * kappa folded once (vote, mask are 0/1: exact).
    head_weight = mask * torch.tensor(kappa, device=device, dtype=cdtype) if rule == "kappa-p" else mask
    n_mask_heads = int(torch.count_nonzero(edit.head_mask))
    counter = torch.zeros(3, device=device, dtype=torch.int64)  # exact counts (float32 stops at 2**24)
    host_counter = [0, 0, 0]  # the counts known on the host without a device op
    handle._counters[edit.layer] = counter
    handle._host_counters[edit.layer] = host_counter
    arange_cache = {"t": torch.arange(4096, device=device)}
    state, scope = handle.state, handle.scope

    def positions(T: int) -> torch.Tensor:
        need = state.past_len + T
        if need > arange_cache["t"].numel():
            arange_cache["t"] = torch.arange(2 * need, device=device)
        return arange_cache["t"][state.past_len : need]

    def hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        B, T = x.shape[0], x.shape[1]
        # In scope: positions [lo, T) of this call, or the (B, T)-broadcastable mask `in_scope`.
        lo, in_scope = 0, None
        if scope == "generation":
            lo = (state.prompt_len or 1) - 1 - state.past_len
        elif scope == "answer":
            start = state.answer_start
            if start is None:
                return None
            if torch.is_tensor(start):
                in_scope = positions(T).unsqueeze(0) >= start.to(device).view(-1, 1)
            else:
                lo = int(start) - state.past_len
        lo = max(lo, 0)
        if lo >= T:
            return None
        xs = x[:, lo:] if lo else x
        Ts = T - lo
        xh = xs.unflatten(-1, (H, d)).to(cdtype)  # (B, Ts, H, d): a view in float32, else one upcast copy
        if probed:
            logits = (xh * W).sum(-1) + w0
            votes = logits > 0
        # Row flag: the vote count reaches tau (always, without a threshold); None = every row.
        if gated:
            flag = votes.sum(-1) >= tau
            if in_scope is not None:
                flag = flag & in_scope
        else:
            flag = in_scope
        # Head weights: shift edits the heads in the mask; the maps edit masked heads that vote.
        if rule == "shift":
            weight = mask
        else:
            weight = votes.to(cdtype) * head_weight
            if rule == "kappa-p":
                weight = weight * torch.sigmoid(logits)
        if flag is not None:
            weight = weight * flag.unsqueeze(-1).to(cdtype)
        if A_minus_I_T is not None:
            delta = torch.bmm(xh.reshape(B * Ts, H, d).transpose(0, 1), A_minus_I_T).transpose(0, 1)
            delta = delta.view(B, Ts, H, d) + b
        else:
            delta = b
        new = (xh + weight.unsqueeze(-1) * delta).flatten(-2).to(dtype)  # one rounding to the model's dtype
        if lo:
            new = torch.cat((x[:, :lo], new), 1)
        # Diagnostics: positions in scope, flagged positions, edited heads (no device sync).
        if in_scope is None:
            host_counter[0] += B * Ts
        else:
            counter[0] += in_scope.expand(B, Ts).sum()
        if flag is None:
            host_counter[1] += B * Ts
        else:
            counter[1] += flag.expand(B, Ts).sum()
        if weight.dim() == 1:  # shift, no gate, no mask: the heads in the mask everywhere
            host_counter[2] += B * Ts * n_mask_heads
        else:
            counter[2] += torch.count_nonzero(weight)
        return (new, *args[1:])

    return hook


def _call_cache(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given: ``cache=`` (transformers >= 5.2x, ``generate`` included),
    ``past_key_values=`` (the deprecated name, still accepted), or positionally."""
    for name in CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    index = cache_arg_index(model)
    if index is not None and index < len(args):
        return args[index]
    return None


def _chunked_prompt_length(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The prompt length of a ``generate`` call whose prefill runs in chunks, else None.

    Without chunks the first forward call is the whole prompt (or its uncached part), which tells
    the hooks the prompt length; with ``prefill_chunk_size`` it is only the first chunk, so the
    length is read from the inputs: the embeddings, else the longer of the ids and the attention
    mask (a mask longer than the ids means that only the new tokens were passed, after a cache).
    """
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if not kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)):
        return None
    embeds = kwargs.get("inputs_embeds")
    if torch.is_tensor(embeds) and embeds.dim() == 3:
        return int(embeds.shape[1])
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not torch.is_tensor(ids) or ids.dim() != 2:
        return None
    mask = kwargs.get("attention_mask")
    mask_len = int(mask.shape[-1]) if torch.is_tensor(mask) and mask.dim() == 2 else 0
    return max(int(ids.shape[1]), mask_len)
