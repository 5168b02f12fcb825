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

Two options of :meth:`otguard.policy.Policy.attach` serve monitoring and measurement:

- ``mode="monitor"`` runs the detector and counts exactly as ``"repair"`` but leaves the
  activations untouched (the outputs are the plain model's); the edit it would apply is still
  computed when records are kept, for the guarantee check.
- ``record=True`` keeps, per forward call and edited layer, per row and in-scope position: the vote
  count, the layer's flag, the number of edited heads, and how many of those the head's own probe
  calls desirable after the edit (and after the full map ``A a + b``). They stay on the device until
  :meth:`PolicyHandle.records` assembles them per row (one host transfer).

Counting: every hooked layer sees the same positions of a call, so ``stats()["positions"]`` (summed
over layers) is the number of in-scope positions times the number of hooked layers; a position is
*flagged* when at least one hooked layer flags it, and "edited heads per flagged position" sums the
edited heads over all layers (a position flagged on two layers with 3 and 4 edited heads counts 7).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch

from otguard.decoding import CACHE_NAMES, cache_arg_index
from otguard.errors import PolicyError
from otguard.sites import HeadSites

if TYPE_CHECKING:
    from otguard.policy import LayerEdit, Policy

Mode = Literal["repair", "monitor"]
MODES = ("repair", "monitor")
# Columns of a per-layer record (B, Ts, 5): see PolicyHandle.records.
_REC_VOTES, _REC_FLAG, _REC_EDITED, _REC_DESIRABLE, _REC_MAPPED = range(5)


class _HookState:
    """Host-side bookkeeping shared by the hooks of one handle (plain ints: no device sync).

    ``call_*`` describe the forward call in progress: which positions any hooked layer flagged (a
    device tensor, or ``call_all`` when a layer flags every position), and its per-layer records.
    The top-level hook folds them into the handle's counters when the next call starts.
    """

    def __init__(self) -> None:
        self.past_len = 0
        self.prompt_len: int | None = None
        self.answer_start: torch.Tensor | int | None = None
        self.call_any: torch.Tensor | None = None  # (B, Ts) bool: flagged on some layer
        self.call_all = False  # a layer flagged every position of the call (no tensor needed)
        self.call_size = 0  # B * Ts of the call's in-scope slice
        self.call_record: dict[str, Any] | None = None


class PolicyHandle:
    """Live hooks of an attached policy. ``remove()`` (or leaving the ``with`` block) detaches.

    Diagnostics accumulate on the device without syncing; :meth:`stats` reads them. With
    ``record=True``, :meth:`records` and :meth:`stats_per_row` give them per row and position.
    """

    def __init__(
        self,
        policy: Policy,
        model: Any,
        sites: HeadSites,
        scope: str,
        kappa: float,
        *,
        mode: Mode = "repair",
        record: bool = False,
    ) -> None:
        if mode not in MODES:
            raise PolicyError(f"Unknown mode {mode!r}; use one of {MODES}.")
        self.policy, self.model, self.scope, self.kappa = policy, model, scope, kappa
        self.mode, self.record = mode, bool(record)
        self.layers = [edit.layer for edit in policy.layers]  # the order of the records' layer axis
        self.state = _HookState()
        self._handles: list[Any] = []
        self._counters: dict[int, torch.Tensor] = {}
        self._host_counters: dict[int, list[int]] = {}
        self._any_counter: torch.Tensor | None = None  # positions flagged on some layer (device)
        self._any_host = 0
        self._records: list[dict[str, Any]] = []  # finished calls of the current sequence
        self._orig_generate = None
        self._own_generate = False
        try:
            self._handles.append(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
            for index, edit in enumerate(policy.layers):
                module = sites.modules[edit.layer]
                hook = _make_edit_hook(edit, index, module, policy.rule, kappa, sites.n_heads, self)
                self._handles.append(module.register_forward_pre_hook(hook))
            if scope == "generation" and hasattr(model, "generate"):
                self._wrap_generate()
        except BaseException:
            self.remove()
            raise

    # -- sequence tracking: which absolute positions does this forward call cover?
    def _top_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._flush_call()
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
        """Start a new sequence: the next forward call defines the prompt length; the records of the
        previous sequence are dropped (``generate`` calls this first, so after it the records cover
        that call). The counters of :meth:`stats` keep accumulating (see :meth:`clear`)."""
        self._flush_call()
        self.state.prompt_len = None
        self.state.past_len = 0
        self._records.clear()

    def clear(self) -> None:
        """Zero the counters of :meth:`stats` and drop the records (e.g. between server batches)."""
        self._flush_call()
        for counter in self._counters.values():
            counter.zero_()
        for host_counter in self._host_counters.values():
            host_counter[:] = [0, 0, 0]
        if self._any_counter is not None:
            self._any_counter.zero_()
        self._any_host = 0
        self._records.clear()

    # -- per-call bookkeeping (called by the layer hooks, folded by the top-level hook)
    def _note_flags(self, flag_any: torch.Tensor | None, B: int, Ts: int) -> None:
        """OR one layer's flags (None: every position of the call) into the call's any-layer flags."""
        state = self.state
        state.call_size = B * Ts
        if flag_any is None:
            state.call_all = True
            return
        flag_any = flag_any.expand(B, Ts)
        if state.call_any is None:
            state.call_any = flag_any
        else:
            state.call_any = state.call_any | flag_any.to(state.call_any.device)

    def _flush_call(self) -> None:
        """Fold the finished call into the counters and the records (device ops only, no sync)."""
        state = self.state
        if state.call_all:
            self._any_host += state.call_size
        elif state.call_any is not None:
            n = state.call_any.sum()
            if self._any_counter is None:
                self._any_counter = torch.zeros((), dtype=torch.int64, device=n.device)
            self._any_counter += n
        state.call_any, state.call_all, state.call_size = None, False, 0
        if state.call_record is not None:
            self._records.append(state.call_record)
            state.call_record = None

    def _note_record(self, index: int, lo: int, T: int, in_scope: torch.Tensor | None,
                     data: torch.Tensor) -> None:  # fmt: skip
        state = self.state
        rec = state.call_record
        if rec is None:
            rec = state.call_record = {"start": state.past_len + lo, "end": state.past_len + T,
                                       "lo": lo, "in_scope": in_scope, "layers": {}}  # fmt: skip
        rec["layers"][index] = data

    # -- reading the diagnostics
    def records(self) -> list[dict[str, torch.Tensor]]:
        """Per batch row, the in-scope positions of the current sequence and what the detector did there.

        Needs ``record=True``. One dict per row (CPU tensors; ``n`` positions, ``L`` hooked layers in
        the order of ``handle.layers``):

        - ``positions (n,)`` int64: absolute positions (past length + index in the call; with left
          padding, positions in the padded sequence), increasing;
        - ``flagged (n,)`` bool: flagged on at least one hooked layer (edited, in repair mode);
        - ``votes (n, L)`` int64: heads whose probe votes undesirable (logit > 0), per layer;
        - ``layer_flagged (n, L)`` bool: the layer's own gate (votes >= tau; always True ungated);
        - ``edited (n, L)`` int64: heads edited (monitor mode: that would be edited);
        - ``desirable (n, L)`` int64: edited heads whose probe logit after the edit is < 0;
        - ``mapped_desirable (n, L)`` int64: edited heads whose full map ``A a + b`` has logit < 0
          (equal to ``desirable`` for the replace rule; SLIM applies only ``kappa p`` of the move).

        Rows come from the forward calls since the last :meth:`reset` (``generate`` resets); calls of
        one sequence are expected to share the batch size (row ``i`` collects row ``i`` of each call).
        """
        if not self.record:
            raise PolicyError("This handle keeps no records; attach the policy with record=True.")
        self._flush_call()
        L = len(self.layers)
        rows: list[dict[str, list[torch.Tensor]]] = []
        for rec in self._records:
            if len(rec["layers"]) != L:
                continue  # a call that stopped between layers (an exception): incomplete
            data = torch.stack([rec["layers"][i].cpu() for i in range(L)], 2).long()  # (B, Ts, L, 5)
            B, Ts = data.shape[0], data.shape[1]
            positions = torch.arange(rec["start"], rec["end"])
            keep = None
            if rec["in_scope"] is not None:
                keep = rec["in_scope"][:, rec["lo"] :].cpu().expand(B, Ts)
            while len(rows) < B:
                rows.append({k: [] for k in ("positions", "data")})
            for i in range(B):
                sel = slice(None) if keep is None else keep[i]
                rows[i]["positions"].append(positions[sel])
                rows[i]["data"].append(data[i, sel])
        out = []
        for row in rows:
            pos = torch.cat(row["positions"]) if row["positions"] else torch.zeros(0, dtype=torch.long)
            data = torch.cat(row["data"]) if row["data"] else torch.zeros(0, L, 5, dtype=torch.long)
            layer_flagged = data[..., _REC_FLAG].bool()
            out.append({
                "positions": pos,
                "flagged": layer_flagged.any(-1),
                "votes": data[..., _REC_VOTES],
                "layer_flagged": layer_flagged,
                "edited": data[..., _REC_EDITED],
                "desirable": data[..., _REC_DESIRABLE],
                "mapped_desirable": data[..., _REC_MAPPED],
            })  # fmt: skip
        return out

    def last_call_flags(self, batch: int) -> torch.Tensor:
        """Whether some hooked layer flagged each row at the last position of the forward call that just
        ran: a ``(batch,)`` bool tensor on the device, no host sync (a decoder reads it together with
        the next tokens). Valid until the next forward call; rows whose batch changes between calls
        (a server that drops or adds rows) read it per call, which is why it exists beside
        :meth:`records`.
        """
        state = self.state
        if state.call_all:
            return torch.ones(batch, dtype=torch.bool)
        if state.call_any is None:  # the call had no position in scope
            return torch.zeros(batch, dtype=torch.bool)
        return state.call_any.reshape(batch, -1)[:, -1]

    def stats_per_row(self, end: Sequence[int] | torch.Tensor | None = None) -> list[dict[str, float]]:
        """Per batch row: ``positions`` (in scope), ``flagged_positions``, ``flag_rate`` and ``flagged``
        (whether any position was flagged), from :meth:`records` (needs ``record=True``).

        ``end[i]``: only positions ``< end[i]`` of row ``i`` count, e.g. ``prompt_width - 1 + n_i``
        for a ``generate`` row with ``n_i`` generated tokens (drops the pad steps after its EOS).
        """
        out = []
        for i, row in enumerate(self.records()):
            flagged = row["flagged"]
            if end is not None:
                flagged = flagged[row["positions"] < int(end[i])]
            n, k = int(flagged.numel()), int(flagged.sum())
            out.append({"positions": float(n), "flagged_positions": float(k),
                        "flag_rate": k / n if n else 0.0, "flagged": k > 0})  # fmt: skip
        return out

    def set_prompt_length(self, n: int) -> None:
        """Declare the prompt length (scope ``"generation"`` edits positions >= n - 1)."""
        self.state.prompt_len = int(n)

    def set_answer_start(self, start: torch.Tensor | int) -> None:
        """First edited absolute position, per row ``(B,)`` or shared (scope ``"answer"``)."""
        self.state.answer_start = start

    def stats(self) -> dict[str, float]:
        """Counts since attaching (or :meth:`clear`), one host sync.

        - ``positions``: in-scope positions summed over hooked layers (positions x layers);
        - ``flag_rate``: share of those (layer, position) pairs whose layer flagged the position;
        - ``flagged_positions``: positions flagged on at least one hooked layer, and
          ``position_flag_rate``: their share of the in-scope positions;
        - ``edited_heads``: edited head activations, all layers; ``edited_heads_per_flag``: that per
          flagged position (summed over layers, not a mean per layer).
        """
        self._flush_call()
        total = torch.zeros(3, dtype=torch.float64)
        for counter in self._counters.values():
            total += counter.double().cpu()
        for host_counter in self._host_counters.values():
            total += torch.tensor(host_counter, dtype=torch.float64)
        positions, flagged, heads = (float(v) for v in total)
        any_flagged = float(self._any_host)
        if self._any_counter is not None:
            any_flagged += float(self._any_counter.cpu())
        distinct = positions / len(self.layers) if self.layers else 0.0
        return {
            "positions": positions,
            "flag_rate": flagged / positions if positions else 0.0,
            "flagged_positions": any_flagged,
            "position_flag_rate": any_flagged / distinct if distinct else 0.0,
            "edited_heads": heads,
            "edited_heads_per_flag": heads / any_flagged if any_flagged else 0.0,
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
    policy: Policy | None,
    model: Any,
    *,
    scope: str | None = None,
    kappa: float | None = None,
    mode: Mode = "repair",
    record: bool = False,
    check_weights: bool = True,
) -> Iterator[PolicyHandle | None]:
    """``policy.attach(model, ...)`` as a ``with`` block, or nothing at all when ``policy`` is None.

    The one idiom for code that runs with an optional policy (the ``none`` baseline is a policy of
    None): ``with attached(policy, model, scope="answer") as handle:`` yields the handle, or None.
    ``mode``, ``record`` and ``check_weights`` are those of :meth:`otguard.policy.Policy.attach`.
    """
    if policy is None:
        yield None
        return
    handle = policy.attach(model, scope=scope, kappa=kappa, mode=mode, record=record,  # type: ignore[arg-type]
                           check_weights=check_weights)  # fmt: skip
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


def _make_edit_hook(edit: LayerEdit, index: int, module: torch.nn.Module, rule: str, kappa: float, H: int,
                    handle: PolicyHandle) -> Any:  # fmt: skip
    """Build the pre-hook of one layer; all tensors are moved to the module's device here, once, in the
    compute dtype (float32, or float64 for a float64 model).

    Per call, which positions are in scope is worked out on the host where it can be (scope
    ``"all"``, ``"generation"`` and a shared answer start: a suffix of the call's positions, the
    whole call during decoding); only that suffix is probed and edited, and a call with nothing in
    scope (the prompt tokens before the last) costs nothing. Per-row answer starts use a mask.
    In monitor mode the hook returns the input unchanged after counting (and recording).
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
    record, monitor = handle.record, handle.mode == "monitor"
    probed = gated or rule != "shift" or record  # probe logits: for the gate, the head votes, the records
    editing = not monitor or record  # the edited activations: applied, or probed for the records
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
        new = None
        if editing:
            if A_minus_I_T is not None:
                delta = torch.bmm(xh.reshape(B * Ts, H, d).transpose(0, 1), A_minus_I_T).transpose(0, 1)
                delta = delta.view(B, Ts, H, d) + b
            else:
                delta = b
            # One rounding to the model's dtype.
            new = (xh + weight.unsqueeze(-1) * delta).flatten(-2).to(dtype)
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
        handle._note_flags(flag, B, Ts)
        if record and new is not None:
            edited = (weight != 0).expand(B, Ts, H)
            # The probe on the activation the model goes on with (after the rounding to its dtype).
            after = (new.unflatten(-1, (H, d)).to(cdtype) * W).sum(-1) + w0
            mapped = ((xh + delta) * W).sum(-1) + w0
            if flag is not None:
                layer_flag = flag.expand(B, Ts).to(torch.int64)
            else:
                layer_flag = torch.ones((B, Ts), dtype=torch.int64, device=x.device)
            columns = (votes.sum(-1), layer_flag, edited.sum(-1), (edited & (after < 0)).sum(-1),
                       (edited & (mapped < 0)).sum(-1))  # fmt: skip
            data = torch.stack(columns, -1)
            handle._note_record(index, lo, T, in_scope, data.to(torch.int32))
        if monitor or new is None:
            return None
        if lo:
            new = torch.cat((x[:, :lo], new), 1)
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
