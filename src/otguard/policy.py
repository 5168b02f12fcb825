"""The intervention policy: everything needed at inference, saved as safetensors + JSON.

A :class:`Policy` holds, for each edited layer, the probe weights ``W (H, d)`` and biases
``w0 (H,)``, the vote threshold ``tau`` (``None`` = always on, for baselines), a head mask, and
the per-head affine map ``a -> A a + b`` (``A is None`` means a pure shift ``a -> a + b``).
The edit rule decides how the map is applied to head ``h`` of a flagged row:

- ``"replace"`` (RADIANT): ``a <- A a + b`` for heads whose own probe votes undesirable;
- ``"kappa-p"`` (SLIM):    ``a <- a + kappa * p_h * (A a + b - a)`` for those heads;
- ``"shift"`` (ITI, mean shift): ``a <- a + b`` for the heads in the mask.

All three are ``a + w_h * ((A - I) a + b)`` with a per-head weight ``w_h``; the hooks that apply
it at inference live in :mod:`otguard.hook`.
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

from otguard.errors import PolicyError
from otguard.hook import PolicyHandle
from otguard.io import atomic_dir, package_version
from otguard.sites import ModelIdentity, find_head_sites, model_identity

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
            "otguard_version": package_version(),
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
        with atomic_dir(Path(directory), kind="policy") as tmp:
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
                f"{spec_file} has format_version {version!r}; this otguard ({package_version()}) reads version "
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


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Cannot store {type(obj).__name__} in policy.json")
