"""Head sites: where per-head attention outputs live in stock Hugging Face models.

In every decoder architecture the attention block ends with an output projection ``W_O`` whose
*input* is the concatenation of the per-head outputs ``softmax(QK^T/sqrt(d)) V`` (shape
``(..., H*d)``). That input is the only place where heads are still separate, so otguard reads
and edits heads with a forward **pre-hook** on that projection: reshape to ``(..., H, d)``. No
patched modeling file is needed.

An architecture is data, not code: the path of the decoder-layer list and the path of the output
projection inside one layer, keyed by ``config.model_type``. Register a new one with
:func:`register_site`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from otguard.errors import PolicyMismatchError, UnsupportedArchitectureError


@dataclass(frozen=True)
class SiteSpec:
    """Where the heads are for one architecture family.

    ``layers`` is the dotted path of the decoder-layer ``ModuleList`` from the causal-LM wrapper
    (a base model without the wrapper is also accepted: the first path component is then
    dropped). ``proj`` is the dotted path, inside one decoder layer, of the attention output
    projection whose input is the concatenation of head outputs.
    """

    layers: str
    proj: str


_LLAMA_LIKE = SiteSpec("model.layers", "self_attn.o_proj")

_SITES: dict[str, SiteSpec] = {
    **{
        mt: _LLAMA_LIKE
        for mt in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "starcoder2",
            "cohere",
            "stablelm",
            "smollm3",
        )
    },
    "gemma3": SiteSpec("model.language_model.layers", "self_attn.o_proj"),
    "gpt2": SiteSpec("transformer.h", "attn.c_proj"),
    "gpt_bigcode": SiteSpec("transformer.h", "attn.c_proj"),
    "gptj": SiteSpec("transformer.h", "attn.out_proj"),
    "gpt_neox": SiteSpec("gpt_neox.layers", "attention.dense"),
    "opt": SiteSpec("model.decoder.layers", "self_attn.out_proj"),
    "phi": SiteSpec("model.layers", "self_attn.dense"),
    "falcon": SiteSpec("transformer.h", "self_attention.dense"),
}


def register_site(model_type: str, layers: str, proj: str, *, overwrite: bool = False) -> None:
    """Teach otguard where the heads of a new architecture are.

    Example: ``register_site("mamba2_hybrid", layers="backbone.layers", proj="mixer.o_proj")``.
    The projection's input must be the concatenation of the per-head outputs (``H * d`` wide);
    this is checked on the real module before any hook is registered.
    """
    if model_type in _SITES and not overwrite:
        raise ValueError(
            f"A head site for model_type {model_type!r} exists; pass overwrite=True to replace it."
        )
    _SITES[model_type] = SiteSpec(layers, proj)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a known head site."""
    return sorted(_SITES)


def check_model_type(model_type: str | None) -> SiteSpec:
    """The head site of ``model_type``; :class:`UnsupportedArchitectureError` when there is none.

    Called on a model folder's ``config.json`` before the weights are loaded, and by
    :func:`find_head_sites`.
    """
    spec = _SITES.get(model_type) if model_type else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"No head site for model_type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "The command line handles only these; from Python, add one with otguard.register_site("
            f"{model_type!r}, layers='model.layers', proj='self_attn.o_proj') (the paths of this model)."
        )
    return spec


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _in_features(module: nn.Module) -> int:
    """Input width of a projection: ``nn.Linear`` or GPT-2's transposed ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and type(module).__name__ == "Conv1D":
        return int(weight.shape[0])
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1])
    raise UnsupportedArchitectureError(
        f"Cannot read the input width of {type(module).__name__}; expected nn.Linear or Conv1D."
    )


@dataclass(frozen=True)
class HeadSites:
    """The head sites of one model: one output projection per layer, plus head geometry.

    ``modules[l]`` is the projection of layer ``l``; its input, reshaped to ``(..., H, d)``, holds
    the per-head outputs. ``n_heads`` counts *query* heads (what we probe), also for GQA/MQA
    models, where ``n_kv_heads`` is smaller.
    """

    model_type: str
    spec: SiteSpec
    layer_path: str
    modules: tuple[nn.Module, ...]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def n_layers(self) -> int:
        return len(self.modules)

    def module_name(self, layer: int) -> str:
        """Dotted module name of layer ``layer``'s projection (for messages and metadata)."""
        return f"{self.layer_path}.{layer}.{self.spec.proj}"


def find_head_sites(model: nn.Module) -> HeadSites:
    """Locate the per-head sites of ``model`` (a causal LM or its base model).

    Raises :class:`UnsupportedArchitectureError` listing the supported families and how to
    register a new one when ``config.model_type`` is unknown or the module layout does not match.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `config`; otguard needs a Hugging Face transformers model."
        )
    model_type = getattr(config, "model_type", None)
    spec = check_model_type(model_type)
    layer_path = spec.layers
    layers = _get_submodule(model, layer_path)
    if layers is None and "." in layer_path:
        layer_path = layer_path.split(".", 1)[1]
        layers = _get_submodule(model, layer_path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"Expected a ModuleList of decoder layers at {spec.layers!r} in {type(model).__name__} "
            f"(model_type {model_type!r}); found none. Re-register the site with the right path."
        )
    tcfg = _text_config(config)
    n_heads = int(tcfg.num_attention_heads)
    hidden = int(tcfg.hidden_size)
    head_dim = getattr(tcfg, "head_dim", None) or hidden // n_heads
    n_kv = getattr(tcfg, "num_key_value_heads", None)
    if n_kv is None and getattr(tcfg, "new_decoder_architecture", False):
        n_kv = tcfg.num_kv_heads  # Falcon-40B/180B layout: grouped KV heads, `multi_query` is ignored
    if n_kv is None:
        multi_query = getattr(tcfg, "multi_query", False)
        n_kv = 1 if multi_query else n_heads
    modules = []
    for i, layer in enumerate(layers):
        proj = _get_submodule(layer, spec.proj)
        if proj is None:
            raise UnsupportedArchitectureError(
                f"Layer {i} of {type(model).__name__} has no module {spec.proj!r}; the head site for "
                f"model_type {model_type!r} does not match this model. Re-register it with register_site()."
            )
        width = _in_features(proj)
        if width != n_heads * head_dim:
            raise UnsupportedArchitectureError(
                f"{layer_path}.{i}.{spec.proj} takes {width} inputs, but the config says "
                f"{n_heads} heads x {head_dim} = {n_heads * head_dim}. This is not a per-head site."
            )
        modules.append(proj)
    return HeadSites(
        model_type=str(model_type),
        spec=spec,
        layer_path=layer_path,
        modules=tuple(modules),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=hidden,
    )


_SIGNATURE_K = 16  # weights sampled per tensor by _weight_signature


def _weight_signature(model: nn.Module, n: int = 8) -> list[float | None]:
    """A few dtype-robust numbers that tell checkpoints apart.

    ``_SIGNATURE_K`` raw weights at fixed, evenly spaced positions of each of ``n`` parameter tensors
    spread over the model, in float64. Raw values, not statistics: the mean |w| of another random
    init or of a fine-tune agrees with the original's to within a few percent (the init scale sets
    it), while the values themselves differ. bf16/fp16 copies of one checkpoint agree to ~0.2%
    (relative L2 per tensor); see :meth:`ModelIdentity.check_compatible`.
    """
    params = [p for p in model.parameters() if p.dim() >= 1 and p.numel() >= _SIGNATURE_K]
    if not params:
        return []
    idx = sorted({round(i * (len(params) - 1) / max(n - 1, 1)) for i in range(n)})
    out: list[float | None] = []
    for i in idx:
        flat = params[i].detach().reshape(-1)
        if flat.device.type == "meta":  # offloaded by accelerate: unreadable here, skipped when comparing
            out.extend([None] * _SIGNATURE_K)
            continue
        pos = torch.arange(_SIGNATURE_K, device=flat.device) * (flat.numel() - 1) // (_SIGNATURE_K - 1)
        out.extend(flat[pos].double().cpu().tolist())
    return out


@dataclass(frozen=True)
class ModelIdentity:
    """What a policy or activation cache records about the model it came from."""

    name_or_path: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    site: str
    signature: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def shape_str(self) -> str:
        return f"{self.n_layers} layers x {self.n_heads} heads x {self.head_dim}"

    def fingerprint(self) -> str:
        """Stable hash (architecture + weight signature rounded to 4 significant digits)."""
        data = self.to_dict()
        data.pop("name_or_path")
        data["signature"] = [None if v is None else float(f"{v:.4g}") for v in self.signature]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def check_compatible(
        self, other: ModelIdentity, *, what: str = "policy", rtol: float = 2e-2, check_weights: bool = True
    ) -> None:
        """Raise :class:`PolicyMismatchError` unless ``other`` is the same model (any dtype/device).

        The architecture must match; with ``check_weights`` the weight signatures must agree to
        ``rtol`` in relative L2 distance per sampled tensor (loose enough for bf16/fp16 copies,
        tight enough to tell checkpoints apart).
        """
        mine = (self.model_type, self.n_layers, self.n_heads, self.head_dim)
        theirs = (other.model_type, other.n_layers, other.n_heads, other.head_dim)
        if mine != theirs:
            raise PolicyMismatchError(
                f"This {what} was fitted for {self.name_or_path} ({self.model_type}, {self.shape_str()}); "
                f"the model is {other.name_or_path} ({other.model_type}, {other.shape_str()}). "
                f"Fit a {what} for this model."
            )
        if check_weights and self.signature and other.signature:
            pairs = [
                (cast(list[float], a), cast(list[float], b))
                for a, b in zip(_blocks(self.signature), _blocks(other.signature), strict=True)
                if None not in a and None not in b  # a block of an offloaded weight is unknown
            ]
            same = len(self.signature) == len(other.signature) and all(
                math.dist(a, b) <= rtol * max(math.hypot(*a), math.hypot(*b)) + 1e-6 for a, b in pairs
            )
            if not same:
                raise PolicyMismatchError(
                    f"This {what} was fitted for {self.name_or_path}; the model {other.name_or_path} has the "
                    f"same architecture ({self.shape_str()}) but different weights. Fit a {what} for this "
                    "model, or, if you know the weights are equivalent, skip this check (command line: "
                    "--no-check-weights; Python: check_weights=False)."
                )


def _blocks(signature: list[float | None]) -> list[list[float | None]]:
    """The signature split per sampled tensor (compared by relative L2 distance, block by block)."""
    return [signature[i : i + _SIGNATURE_K] for i in range(0, len(signature), _SIGNATURE_K)]


def model_identity(model: nn.Module, sites: HeadSites | None = None) -> ModelIdentity:
    """Describe ``model`` for policies and caches (name, architecture, heads, weight signature)."""
    sites = sites or find_head_sites(model)
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "unknown"
    return ModelIdentity(
        name_or_path=str(name),
        model_type=sites.model_type,
        n_layers=sites.n_layers,
        n_heads=sites.n_heads,
        n_kv_heads=sites.n_kv_heads,
        head_dim=sites.head_dim,
        hidden_size=sites.hidden_size,
        site=f"{sites.layer_path}.{{layer}}.{sites.spec.proj}",
        signature=_weight_signature(model),
    )


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(..., H*d) -> (..., H, d)`` view of a projection input."""
    return x.unflatten(-1, (n_heads, x.shape[-1] // n_heads))
