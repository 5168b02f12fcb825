"""The intervention policy: everything needed at inference, saved as safetensors + JSON.

A :class:`Policy` holds, for each edited layer, the probe weights ``W (H, d)`` and biases
``w0 (H,)``, the vote threshold ``tau`` (``None`` = always on, for baselines), a head mask, and
the per-head affine map ``a -> A a + b`` (``A is None`` means a pure shift ``a -> a + b``).
The edit rule decides how the map is applied to head ``h`` of a flagged row:

- ``"replace"`` (RADIANT): ``a <- A a + b`` for heads whose own probe votes undesirable;
- ``"kappa-p"`` (SLIM):    ``a <- a + kappa * p_h * (A a + b - a)`` for those heads;
- ``"shift"`` (ITI, mean shift): ``a <- a + b`` for the heads in the mask.

All three are ``a + w_h * ((A - I) a + b)`` with a per-head weight ``w_h``, so the hook is one
product for the probe logits, a vote, one batched affine edit, and no Python loop over heads or
tokens, no host sync and no tensor built per call. It is a forward **pre-hook** on the output
projection of the layer (the per-head site, see :mod:`otguard.sites`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from otguard.activations import atomic_dir
from otguard.errors import PolicyError
from otguard.sites import HeadSites, ModelIdentity, find_head_sites, model_identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EditRule = Literal["replace", "kappa-p", "shift"]
Scope = Literal["generation", "answer", "all"]
_RULES = ("replace", "kappa-p", "shift")
_SCOPES = ("generation", "answer", "all")


@dataclass
class LayerEdit:
    """The detector and the per-head maps of one layer. Shapes: H heads, d head dim."""

    layer: int
    probe_weight: torch.Tensor  # (H, d)
    probe_bias: torch.Tensor  # (H,)
    threshold: int | None  # flag a row iff sum_h vote_h >= threshold; None = always flag
    head_mask: torch.Tensor  # (H,) bool: heads that may be edited
    b: torch.Tensor  # (H, d)
    A: torch.Tensor | None = None  # (H, d, d); None = identity (pure shift)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "probe_weight": self.probe_weight,
            "probe_bias": self.probe_bias,
            "head_mask": self.head_mask.to(torch.uint8),
            "b": self.b,
        }
        if self.A is not None:
            out["A"] = self.A
        return {f"layer{self.layer}.{k}": v.detach().contiguous().cpu() for k, v in out.items()}


@dataclass
class Policy:
    """A fitted intervention: detector + head-wise maps + edit rule + provenance.

    Build one with a method (``otguard.methods``), save it with :meth:`save`, reload it with
    :meth:`load`, and use it with ``with policy.attach(model): model.generate(...)``.
    """

    method: str
    rule: EditRule
    layers: list[LayerEdit]
    model: ModelIdentity
    params: dict[str, Any] = field(default_factory=dict)
    kappa: float = 1.0
    scope: Scope = "generation"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise PolicyError(f"Unknown edit rule {self.rule!r}; use one of {_RULES}.")
        if self.scope not in _SCOPES:
            raise PolicyError(f"Unknown edit scope {self.scope!r}; use one of {_SCOPES}.")
        H, d = self.model.n_heads, self.model.head_dim
        for edit in self.layers:
            if not 0 <= edit.layer < self.model.n_layers:
                raise PolicyError(f"Layer {edit.layer} is outside 0..{self.model.n_layers - 1}.")
            shapes = {"probe_weight": (H, d), "probe_bias": (H,), "head_mask": (H,), "b": (H, d)}
            if edit.A is not None:
                shapes["A"] = (H, d, d)
            for name, shape in shapes.items():
                got = tuple(getattr(edit, name).shape)
                if got != shape:
                    raise PolicyError(f"Layer {edit.layer}: {name} has shape {got}, expected {shape}.")

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``policy.json`` + ``tensors.safetensors`` into ``directory`` (atomically)."""
        spec = {
            "format_version": FORMAT_VERSION,
            "otguard_version": _version(),
            "method": self.method,
            "rule": self.rule,
            "kappa": self.kappa,
            "scope": self.scope,
            "params": self.params,
            "model": self.model.to_dict(),
            "layers": [
                {"layer": e.layer, "threshold": e.threshold, "has_A": e.A is not None} for e in self.layers
            ],
            "meta": self.meta,
        }
        tensors: dict[str, torch.Tensor] = {}
        for edit in self.layers:
            tensors.update(edit.tensors())
        with atomic_dir(Path(directory)) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "otguard-policy"})
            text = json.dumps(spec, indent=2, sort_keys=True, default=_json_default)
            (tmp / "policy.json").write_text(text)
        return Path(directory)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        model: Any = None,
        check_weights: bool = True,
    ) -> Policy:
        """Read a policy folder. With ``model``, check it was fitted for that model.

        Tensors are loaded on the CPU in float32; :meth:`attach` moves them to the hooked
        module's device and dtype, so a policy fitted on one machine/device works on another.
        """
        path = Path(directory)
        spec_file, tensor_file = path / "policy.json", path / "tensors.safetensors"
        if not spec_file.is_file() or not tensor_file.is_file():
            raise PolicyError(
                f"{path} is not a policy folder: it needs policy.json and tensors.safetensors "
                "(written by Policy.save / `otguard fit --out`)."
            )
        try:
            spec = json.loads(spec_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(
                f"{spec_file} is not valid JSON ({exc}); the policy is corrupted, refit it."
            ) from exc
        if not isinstance(spec, dict):
            raise PolicyError(f"{spec_file} does not hold a JSON object; the policy is corrupted, refit it.")
        version = spec.get("format_version")
        if version != FORMAT_VERSION:
            raise PolicyError(
                f"{spec_file} has format_version {version!r}; this otguard ({_version()}) reads version "
                f"{FORMAT_VERSION}. Refit the policy or install the otguard version that wrote it "
                f"({spec.get('otguard_version', 'unknown')})."
            )
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PolicyError(
                f"{tensor_file} cannot be read ({exc}); the policy is corrupted, refit it."
            ) from exc
        try:
            layers = []
            for entry in spec["layers"]:
                pre = f"layer{entry['layer']}."
                layers.append(
                    LayerEdit(
                        layer=int(entry["layer"]),
                        probe_weight=tensors[pre + "probe_weight"].float(),
                        probe_bias=tensors[pre + "probe_bias"].float(),
                        threshold=entry["threshold"],
                        head_mask=tensors[pre + "head_mask"].bool(),
                        b=tensors[pre + "b"].float(),
                        A=tensors[pre + "A"].float() if entry["has_A"] else None,
                    )
                )
            policy = cls(
                method=spec["method"],
                rule=spec["rule"],
                layers=layers,
                model=ModelIdentity.from_dict(spec["model"]),
                params=spec.get("params", {}),
                kappa=float(spec.get("kappa", 1.0)),
                scope=spec.get("scope", "generation"),
                meta=spec.get("meta", {}),
            )
        except KeyError as exc:
            raise PolicyError(
                f"{path}: missing entry {exc} in the policy files; the policy is corrupted."
            ) from exc
        if model is not None:
            policy.model.check_compatible(model_identity(model), check_weights=check_weights)
        return policy

    # ------------------------------------------------------------------ inference
    def attach(
        self,
        model: Any,
        *,
        scope: Scope | None = None,
        kappa: float | None = None,
        check_weights: bool = True,
    ) -> PolicyHandle:
        """Register the edit hooks on ``model``; returns a handle that is also a context manager.

        ``scope``: ``"generation"`` (the last prompt token and every generated token),
        ``"answer"`` (positions from ``handle.set_answer_start(...)`` on) or ``"all"``.
        ``kappa`` overrides the SLIM strength without refitting.
        """
        scope = scope or self.scope
        if scope not in _SCOPES:
            raise PolicyError(f"Unknown edit scope {scope!r}; use one of {_SCOPES}.")
        sites = find_head_sites(model)
        self.model.check_compatible(model_identity(model, sites), check_weights=check_weights)
        return PolicyHandle(self, model, sites, scope, self.kappa if kappa is None else float(kappa))

    def with_kappa(self, kappa: float) -> Policy:
        """A copy with another SLIM strength (no refit needed)."""
        return replace(self, kappa=float(kappa))

    def summary(self) -> str:
        """One line for logs and the CLI."""
        layers = ", ".join(
            f"{e.layer} (tau={e.threshold}, heads={int(e.head_mask.sum())})" for e in self.layers
        )
        return f"{self.method} policy ({self.rule}) for {self.model.name_or_path}: layers {layers}"


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
        past = kwargs.get("past_key_values")
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        self.state.past_len = past_len
        if self.state.prompt_len is None:
            self.state.prompt_len = past_len + T

    def _wrap_generate(self) -> None:
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            self.reset()
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
    """Build the pre-hook of one layer; all tensors are moved to the module's device/dtype here, once.

    Per call, which positions are in scope is worked out on the host where it can be (scope
    ``"all"``, ``"generation"`` and a shared answer start: a suffix of the call's positions, the
    whole call during decoding); only that suffix is probed and edited, and a call with nothing in
    scope (the prompt tokens before the last) costs nothing. Per-row answer starts use a mask.
    """
    device, dtype = _module_device_dtype(module)
    d = int(edit.b.shape[-1])
    W = edit.probe_weight.to(device=device, dtype=dtype)
    w0 = edit.probe_bias.to(device=device, dtype=dtype)
    mask = edit.head_mask.to(device=device, dtype=dtype)
    b = edit.b.to(device=device, dtype=dtype)
    A_minus_I_T = None  # (H, e, d) = (A - I) transposed, for one bmm over heads
    if edit.A is not None and rule != "shift":
        eye = torch.eye(edit.A.shape[-1], dtype=edit.A.dtype)
        A_minus_I_T = (edit.A - eye).transpose(1, 2).contiguous().to(device=device, dtype=dtype)
    gated = edit.threshold is not None
    probed = gated or rule != "shift"  # the probe logits are needed for the gate or the head votes
    tau = int(edit.threshold) if gated else 0
    # kappa-p weight = vote * mask * kappa * p; mask * kappa folded once (vote, mask are 0/1: exact).
    head_weight = mask * torch.tensor(kappa, device=device, dtype=dtype) if rule == "kappa-p" else mask
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
        xh = xs.unflatten(-1, (H, d))  # (B, Ts, H, d), a view
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
            weight = votes.to(dtype) * head_weight
            if rule == "kappa-p":
                weight = weight * torch.sigmoid(logits)
        if flag is not None:
            weight = weight * flag.unsqueeze(-1).to(dtype)
        if A_minus_I_T is not None:
            delta = torch.bmm(xh.reshape(B * Ts, H, d).transpose(0, 1), A_minus_I_T).transpose(0, 1)
            delta = delta.view(B, Ts, H, d) + b
        else:
            delta = b
        new = (xh + weight.unsqueeze(-1) * delta).flatten(-2)
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


def _version() -> str:
    from otguard import __version__

    return __version__


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Cannot store {type(obj).__name__} in policy.json")
