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

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from otguard.errors import PolicyError
from otguard.hook import MODES, Mode, PolicyHandle
from otguard.io import atomic_dir, package_version, sha256_file
from otguard.sites import ModelIdentity, find_head_sites, model_identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EditRule = Literal["replace", "kappa-p", "shift"]
Scope = Literal["generation", "answer", "all"]
_RULES = ("replace", "kappa-p", "shift")
_SCOPES = ("generation", "answer", "all")
TENSORS_FILE = "tensors.safetensors"
SPEC_FILE = "policy.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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
        bad = _non_finite(tensors)
        if bad:
            raise PolicyError(
                f"Cannot save this policy: {', '.join(bad)} hold NaN or infinite values (a failed fit); "
                "refit it."
            )
        if not math.isfinite(self.kappa):
            raise PolicyError(f"Cannot save this policy: kappa is {self.kappa}; use a finite strength.")
        with atomic_dir(Path(directory), kind="policy") as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "otguard-policy"})
            spec["tensors_sha256"] = sha256_file(tmp / TENSORS_FILE)
            text = json.dumps(spec, indent=2, sort_keys=True, default=_json_default)
            (tmp / SPEC_FILE).write_text(text + "\n", encoding="utf-8")
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
        ``directory`` may be ``hf://org/name[@revision]`` (see :mod:`otguard.hub`): downloaded once
        into the Hub cache, then checked like a local folder.
        """
        from otguard.hub import resolve_policy_path

        path = resolve_policy_path(directory)
        spec = read_spec(path)
        tensor_file = path / TENSORS_FILE
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PolicyError(
                f"{tensor_file} cannot be read ({exc}); the policy is corrupted, refit it."
            ) from exc
        expected = spec.get("tensors_sha256")
        if expected is None:
            logger.warning(
                "%s was written by an older otguard (%s) without a checksum of %s, so corruption of the "
                "tensors cannot be detected; refit it, or re-save it from Python (Policy.load(p).save(p)) "
                "to add one.",
                path / SPEC_FILE,
                spec.get("otguard_version", "unknown"),
                TENSORS_FILE,
            )
        elif sha256_file(tensor_file) != expected:
            raise PolicyError(
                f"{tensor_file} does not match the checksum recorded in {SPEC_FILE} (tensors_sha256); the "
                "policy is corrupted or its files come from different fits. Refit it or restore both files."
            )
        bad = _non_finite(tensors)
        if bad:
            raise PolicyError(
                f"{tensor_file}: {', '.join(bad[:4])} hold NaN or infinite values; the policy is corrupted, "
                "refit it."
            )
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
        except KeyError as exc:
            raise PolicyError(
                f"{tensor_file}: missing tensor {exc} named in {SPEC_FILE}; the policy is corrupted, "
                "refit it."
            ) from exc
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
        mode: Mode = "repair",
        record: bool = False,
    ) -> PolicyHandle:
        """Register the edit hooks on ``model``; returns a handle that is also a context manager.

        ``scope``: ``"generation"`` (the last prompt token and every generated token),
        ``"answer"`` (positions from ``handle.set_answer_start(...)`` on) or ``"all"``.
        ``kappa`` overrides the SLIM strength without refitting.
        ``mode``: ``"repair"`` detects and edits; ``"monitor"`` detects and counts the same way but
        edits nothing (the outputs are the plain model's). ``record=True`` keeps the per-row,
        per-position detector record (``handle.records()``, ``handle.stats_per_row()``).
        """
        scope = scope or self.scope
        if scope not in _SCOPES:
            raise PolicyError(f"Unknown edit scope {scope!r}; use one of {_SCOPES}.")
        if mode not in MODES:
            raise PolicyError(f"Unknown mode {mode!r}; use one of {MODES}.")
        sites = find_head_sites(model)
        self.model.check_compatible(model_identity(model, sites), check_weights=check_weights)
        kappa = self.kappa if kappa is None else float(kappa)
        return PolicyHandle(self, model, sites, scope, kappa, mode=mode, record=record)

    def fingerprint(self) -> str:
        """A SHA-256 of everything that decides what the attached policy does (rule, κ, scope, layers,
        thresholds, tensors), not of its metadata: two policies with the same fingerprint edit alike,
        so their outputs can be computed once (the comparison harness memoises answers by it)."""
        h = hashlib.sha256(json.dumps([self.rule, float(self.kappa), self.scope]).encode())
        for edit in self.layers:
            h.update(json.dumps([edit.layer, edit.threshold]).encode())
            for name, tensor in sorted(edit.tensors().items()):
                h.update(name.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def with_kappa(self, kappa: float) -> Policy:
        """A copy with another SLIM strength (no refit needed)."""
        return replace(self, kappa=float(kappa))

    # ------------------------------------------------------------------ Hugging Face Hub
    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Publish this policy (its two files and a model card) to the Hub repository ``repo_id``.

        See :func:`otguard.hub.push_to_hub` (``path_in_repo``, ``license``, ``endpoint``).
        """
        from otguard.hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, **kwargs)  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        revision: str | None = None,
        model: Any = None,
        check_weights: bool = True,
        **kwargs: Any,
    ) -> Policy:
        """Load a policy from a local folder, a Hub repository ``org/name`` or ``hf://org/name[@rev]``.

        Only ``policy.json`` and ``tensors.safetensors`` are downloaded, then :meth:`load` checks
        them as it checks any folder. See :func:`otguard.hub.from_pretrained` (``cache_dir``, ``token``).
        """
        from otguard.hub import from_pretrained

        return from_pretrained(cls, source, revision=revision, model=model, check_weights=check_weights,
                               **kwargs)  # fmt: skip

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


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an infinity."""
    return sorted(
        name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )


def read_spec(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``policy.json`` of a policy folder (no tensors loaded, no model needed).

    Cheap, so the CLI checks ``--policy`` before it loads a model. Raises :class:`PolicyError`
    naming the file and what is wrong with it.
    """
    path = Path(directory)
    spec_file, tensor_file = path / SPEC_FILE, path / TENSORS_FILE
    if not spec_file.is_file() or not tensor_file.is_file():
        raise PolicyError(
            f"{path} is not a policy folder: it needs {SPEC_FILE} and {TENSORS_FILE} "
            "(written by Policy.save / `otguard fit --out`)."
        )
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(
            f"{spec_file} is not valid JSON ({exc}); the policy is corrupted, refit it."
        ) from exc
    except OSError as exc:
        raise PolicyError(f"{spec_file} cannot be read ({exc.strerror}).") from exc
    if not isinstance(spec, dict):
        raise PolicyError(f"{spec_file} does not hold a JSON object; the policy is corrupted, refit it.")
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise PolicyError(
            f"{spec_file} has format_version {version!r}; this otguard ({package_version()}) reads version "
            f"{FORMAT_VERSION}. Refit the policy or install the otguard version that wrote it "
            f"({spec.get('otguard_version', 'unknown')})."
        )
    problem = _spec_problem(spec)
    if problem:
        raise PolicyError(f"{spec_file} is corrupted: {problem}. Refit the policy or restore the file.")
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _spec_problem(spec: dict[str, Any]) -> str | None:
    """What is wrong with a ``policy.json`` object (its schema), or ``None``."""
    required = {"method": str, "rule": str, "model": dict, "layers": list}
    for key, kind in required.items():
        if key not in spec:
            return f"missing entry {key!r}"
        if not isinstance(spec[key], kind):
            return f"{key!r} is {type(spec[key]).__name__} {spec[key]!r:.60}, expected a JSON {_JSON[kind]}"
    for key, kind in {"params": dict, "meta": dict, "scope": str}.items():
        if key in spec and not isinstance(spec[key], kind):
            return f"{key!r} is {type(spec[key]).__name__}, expected a JSON {_JSON[kind]}"
    if spec["rule"] not in _RULES:
        return f"'rule' is {spec['rule']!r}, expected one of {_RULES}"
    if spec.get("scope", "generation") not in _SCOPES:
        return f"'scope' is {spec['scope']!r}, expected one of {_SCOPES}"
    if "kappa" in spec and not _is_number(spec["kappa"]):
        return f"'kappa' is {spec['kappa']!r}, expected a finite number"
    sha = spec.get("tensors_sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.match(sha)):
        return f"'tensors_sha256' is {sha!r:.80}, expected 64 hex digits"
    model = spec["model"]
    for key in ("model_type", "name_or_path", "site"):
        if not isinstance(model.get(key), str):
            return f"model.{key} is {'missing' if key not in model else repr(model[key])}, expected a string"
    for key in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size"):
        value = model.get(key)
        if not _is_int(value) or value < 1:
            got = "missing" if key not in model else repr(value)
            return f"model.{key} is {got}, expected a positive integer"
    signature = model.get("signature", [])
    if not isinstance(signature, list) or not all(v is None or _is_number(v) for v in signature):
        return "model.signature must be a list of numbers"
    if not spec["layers"] and spec.get("method") != "none":
        return "'layers' is empty (only a 'none' policy edits no layer)"
    seen: set[int] = set()
    for i, entry in enumerate(spec["layers"]):
        if not isinstance(entry, dict):
            return f"layers[{i}] is {type(entry).__name__}, expected a JSON object"
        for key in ("layer", "threshold", "has_A"):
            if key not in entry:
                return f"layers[{i}] misses {key!r} (missing entry {key!r})"
        layer, tau = entry["layer"], entry["threshold"]
        if not _is_int(layer) or not 0 <= layer < model["n_layers"]:
            return f"layers[{i}].layer is {layer!r}, expected an integer in 0..{model['n_layers'] - 1}"
        if layer in seen:
            return f"layer {layer} appears twice in 'layers'"
        seen.add(layer)
        if tau is not None and (not _is_int(tau) or not 0 <= tau <= model["n_heads"] + 1):
            return (
                f"layers[{i}].threshold is {tau!r}, expected null or an integer vote count in "
                f"0..{model['n_heads'] + 1}"
            )
        if not isinstance(entry["has_A"], bool):
            return f"layers[{i}].has_A is {entry['has_A']!r}, expected true or false"
    return None


_JSON = {str: "string", dict: "object", list: "array"}
