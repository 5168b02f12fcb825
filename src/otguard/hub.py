"""Policies on the Hugging Face Hub: publish (``push_to_hub``), fetch (``from_pretrained``), ``hf://`` paths.

A policy repository holds exactly what :meth:`otguard.policy.Policy.save` writes (``policy.json`` and
``tensors.safetensors``) plus a generated ``README.md`` model card. Fetching downloads **only those
two files** (``allow_patterns``), through ``huggingface_hub``'s cache, so it works offline once cached
(``HF_HUB_OFFLINE=1``) and never runs code from the repository; the folder then goes through
:meth:`Policy.load <otguard.policy.Policy.load>` like any local one (format version, schema,
checksum, non-finite values, model identity).

``hf://[models/|datasets/]org/name[@revision][/sub/folder]`` is accepted wherever a policy path is
(``Policy.load``, ``otguard generate --policy``, ``otguard serve --policy NAME=...``), through the one
resolver :func:`resolve_policy_path`. A bare ``org/name`` is a repository only for
:meth:`Policy.from_pretrained <otguard.policy.Policy.from_pretrained>`; everywhere else it is a local
path, so a typo never turns into a network request.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otguard.errors import PolicyError

if TYPE_CHECKING:
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

HF_SCHEME = "hf://"
SPEC_FILE = "policy.json"  # the names Policy.save writes (re-declared: policy.py imports this module)
TENSORS_FILE = "tensors.safetensors"
CARD_FILE = "README.md"
_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID_RE = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")
_SPECIAL_REF_RE = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` policy reference."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""
    repo_type: str = "model"

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_SCHEME}{kind}{self.repo_id}{rev}{sub}"


def is_hub_reference(value: Any) -> bool:
    """Whether ``value`` is an ``hf://`` string (paths and ``Path`` objects never are)."""
    return isinstance(value, str) and value.startswith(HF_SCHEME)


def parse_hub_reference(uri: str) -> HubRef:
    """Split ``hf://[models/|datasets/]org/name[@revision][/sub/folder]`` into its parts.

    The revision may be a branch, a tag, a commit hash or ``refs/pr/N``; a branch name with ``/`` in
    it cannot be told from a subfolder, so give such revisions with ``revision=`` instead.
    """
    if not is_hub_reference(uri):
        raise PolicyError(f"{uri!r} is not an hf:// reference; write hf://org/name[@revision].")
    body = uri[len(HF_SCHEME) :].strip("/")
    repo_type = "model"
    first, _, rest = body.partition("/")
    if first in _REPO_TYPES and rest:
        repo_type, body = _REPO_TYPES[first], rest
    elif first in ("spaces", "buckets", "kernels"):
        raise PolicyError(f"{uri}: policies live in model or dataset repositories, not in {first}.")
    revision: str | None = None
    subfolder = ""
    if "@" in body:
        repo_id, _, tail = body.partition("@")
        special = _SPECIAL_REF_RE.match(tail)
        if special:
            revision, subfolder = special.group(0), tail[special.end() :].strip("/")
        else:
            revision, _, subfolder = tail.partition("/")
        if not revision:
            raise PolicyError(
                f"{uri}: nothing after '@'; write hf://org/name@revision (branch, tag, commit)."
            )
    else:
        parts = body.split("/")
        repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PolicyError(f"{uri}: {repo_id!r} is not a Hub repository id; write hf://org/name[@revision].")
    if ".." in subfolder.split("/"):
        raise PolicyError(f"{uri}: the folder inside the repository may not contain '..'.")
    return HubRef(repo_id=repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type)


def resolve_policy_path(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """The local folder of a policy: ``hf://...`` is downloaded (or found in the Hub cache), anything
    else is returned as a path, untouched. The one place every command resolves ``--policy``."""
    if not is_hub_reference(source):
        return Path(source)
    ref = parse_hub_reference(str(source))
    if revision is not None and ref.revision is not None and revision != ref.revision:
        raise PolicyError(
            f"{source} names revision {ref.revision!r} but revision={revision!r} too; give one."
        )
    return download_policy(
        ref.repo_id,
        revision=revision or ref.revision,
        subfolder=ref.subfolder,
        repo_type=ref.repo_type,
        cache_dir=cache_dir,
        token=token,
        endpoint=endpoint,
    )


def download_policy(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str = "",
    repo_type: str = "model",
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """Fetch the two policy files of ``repo_id`` into the Hub cache and return their folder.

    Only ``policy.json`` and ``tensors.safetensors`` are downloaded (no code, no pickles); offline
    (``HF_HUB_OFFLINE=1`` or no network) the cached snapshot of ``revision`` is used.
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    where = str(HubRef(repo_id, revision, subfolder.strip("/"), repo_type))
    try:
        root = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=[prefix + SPEC_FILE, prefix + TENSORS_FILE],
            cache_dir=None if cache_dir is None else Path(cache_dir),
            token=token,
            endpoint=endpoint,
            library_name="otguard",
        )
    except hf_errors.RevisionNotFoundError as exc:
        raise PolicyError(
            f"{where}: the repository has no revision {revision!r}; check the branch or tag."
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise PolicyError(
            f"{where}: no such repository on the Hub, or it is private or gated; check the name, or log in "
            "(`hf auth login`, or pass token=...)."
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise PolicyError(
            f"{where} is not in the local Hub cache and the Hub cannot be reached (offline, no network); "
            "download it once with network access (or set HF_HUB_CACHE to a cache that holds it), or give a "
            "local policy folder."
        ) from exc
    except hf_errors.HFValidationError as exc:
        raise PolicyError(f"{where}: {exc}".splitlines()[0]) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise PolicyError(f"{where}: the Hub refused the download ({str(exc).splitlines()[0]}).") from exc
    folder = Path(root) / prefix
    missing = [name for name in (SPEC_FILE, TENSORS_FILE) if not (folder / name).is_file()]
    if missing:
        raise PolicyError(
            f"{where} holds no {' and no '.join(missing)}: it is not an otguard policy repository "
            "(publish one with Policy.push_to_hub)."
        )
    return folder


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def from_pretrained(
    cls: type[Policy],
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    model: Any = None,
    check_weights: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Policy:
    """``Policy.from_pretrained``: a local policy folder, ``org/name`` or ``hf://...`` on the Hub."""
    name = os.fspath(source)
    if is_hub_reference(name):
        path = resolve_policy_path(
            name, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint
        )
    elif Path(name).expanduser().is_dir():
        if revision is not None:
            raise PolicyError(
                f"{name} is a local folder; revision={revision!r} is only for Hub repositories."
            )
        path = Path(name).expanduser()
    elif (
        not isinstance(source, str)  # a Path is always local
        or _looks_like_local_path(name)
        or not _REPO_ID_RE.match(name)
        or ("/" in name and Path(name.split("/", 1)[0]).is_dir())  # runs/typo while runs/ exists
    ):
        raise PolicyError(
            f"No such policy folder: {name} (and it is not a Hub repository id such as org/name)."
        )
    else:
        path = download_policy(name, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
    return cls.load(path, model=model, check_weights=check_weights)


# ---------------------------------------------------------------------------------------- upload
def push_to_hub(
    policy: Policy,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    path_in_repo: str = "",
    license: str | None = None,
    endpoint: str | None = None,
) -> Any:
    """``Policy.push_to_hub``: create the repository if needed and commit the policy and its card.

    One commit adds ``policy.json``, ``tensors.safetensors`` (byte-identical to ``Policy.save``)
    and ``README.md`` (see :func:`model_card`); a ``revision`` that is not a branch yet is created
    from the default branch. Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not _REPO_ID_RE.match(repo_id) or "/" not in repo_id:
        raise PolicyError(f"{repo_id!r} is not a Hub repository id; use org/name (or user/name).")
    sub = path_in_repo.strip("/")
    if ".." in sub.split("/"):
        raise PolicyError(f"path_in_repo {path_in_repo!r} may not contain '..'.")
    prefix = f"{sub}/" if sub else ""
    api = HfApi(endpoint=endpoint, token=token, library_name="otguard")
    with tempfile.TemporaryDirectory(prefix="otguard-push-") as tmp:
        folder = policy.save(Path(tmp) / "policy")  # the same checks and bytes as a local save
        card = model_card(policy, repo_id, path_in_repo=sub, license=license)
        operations = [
            CommitOperationAdd(path_in_repo=prefix + SPEC_FILE, path_or_fileobj=str(folder / SPEC_FILE)),
            CommitOperationAdd(
                path_in_repo=prefix + TENSORS_FILE, path_or_fileobj=str(folder / TENSORS_FILE)
            ),
            CommitOperationAdd(path_in_repo=prefix + CARD_FILE, path_or_fileobj=card.encode("utf-8")),
        ]
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload otguard {policy.method} policy",
            revision=revision,
        )
    logger.info("pushed %s to %s", policy.summary(), getattr(info, "commit_url", repo_id))
    return info


# ------------------------------------------------------------------------------------ model card
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)[:120]
    return str(value)


def _hub_base_model(name: str) -> str | None:
    """The base model's Hub id for the card's metadata, or None for a local path or an alias."""
    if _looks_like_local_path(name) or "/" not in name or not _REPO_ID_RE.match(name):
        return None
    return name


def _validation_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Validation metrics recorded by the fit (detector at the chosen layer, guarantee, Stage 3)."""
    rows: list[tuple[str, str]] = []
    layer = meta.get("layer")
    det = meta.get("detector_val")
    if isinstance(det, dict) and isinstance(layer, int):
        for key in ("accuracy", "f1", "fpr", "fnr"):
            values = det.get(key)
            if isinstance(values, list) and 0 <= layer < len(values) and values[layer] is not None:
                rows.append((f"detector {key} (validation, layer {layer})", _fmt(float(values[layer]))))
    rates = [r for r in meta.get("guarantee_rate_val") or [] if isinstance(r, int | float)]
    if rates:
        rows.append(("guarantee rate (validation, mean over heads)", _fmt(sum(rates) / len(rates))))
    stage3 = meta.get("stage3")
    if isinstance(stage3, dict) and "kappa" in stage3:
        rows.append(("Stage 3 kappa", _fmt(stage3["kappa"])))
        rows3 = [r for r in stage3.get("rows") or [] if isinstance(r, dict)]
        chosen = [r for r in rows3 if r.get("kappa") == stage3["kappa"]]
        for key in ("score", "preservation", "conversion", "sem"):
            if chosen and key in chosen[0]:
                rows.append((f"Stage 3 {key} (validation)", _fmt(chosen[0][key])))
    for key in ("dataset", "n_train", "n_val", "fold", "folds"):
        if meta.get(key) is not None:
            rows.append((key, _fmt(meta[key])))
    return rows


def model_card(policy: Policy, repo_id: str, *, path_in_repo: str = "", license: str | None = None) -> str:
    """The ``README.md`` of a policy repository: YAML metadata, what the policy is, how to load it."""
    from otguard.io import package_version

    ident = policy.model
    base = _hub_base_model(ident.name_or_path)
    meta_lines = ["---", "library_name: otguard", "tags:", "- otguard", "- activation-steering",
                  f"- {policy.method}"]  # fmt: skip
    if base:
        meta_lines.append(f"base_model: {base}")
    if license:
        meta_lines.append(f"license: {license}")
    meta_lines.append("---")
    uri = f"{HF_SCHEME}{repo_id}" + (f"/{path_in_repo}" if path_in_repo else "")
    layers = (
        "\n".join(
            f"| {e.layer} | {'always' if e.threshold is None else e.threshold} | {int(e.head_mask.sum())} "
            f"| {'affine (A, b)' if e.A is not None else 'shift (b)'} |"
            for e in policy.layers
        )
        or "| - | - | - | - |"
    )
    params = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in sorted(policy.params.items())) or "| - | - |"
    metrics = _validation_rows(policy.meta)
    metric_table = (
        "| metric | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in metrics)
        if metrics
        else "No validation metrics were recorded with this policy."
    )
    declared = f"This policy is released under `{license}`. " if license else "No license was declared. "
    license_note = declared + (
        f"The policy was fitted on the activations of `{ident.name_or_path}` and only works with that "
        "model, whose own license governs its use; otguard itself is Apache-2.0."
    )
    body = f"""
# otguard policy: {policy.method} for {ident.name_or_path}

An [otguard](https://pypi.org/project/otguard/) attention-head intervention policy: a per-head detector
(probe weights and a vote threshold) and per-head maps that repair the flagged positions at inference.
It holds only tensors (`{TENSORS_FILE}`) and a JSON description (`{SPEC_FILE}`): no code.

- **Base model**: `{ident.name_or_path}` ({ident.model_type}, {ident.shape_str()}, site `{ident.site}`);
  loading checks the architecture and a weight signature of the model it is attached to.
- **Method**: `{policy.method}`, edit rule `{policy.rule}`, kappa {_fmt(policy.kappa)}, default scope
  `{policy.scope}`.
- **Written by**: otguard {package_version()}.

## Edited layers

| layer | vote threshold | heads | map |
| --- | --- | --- | --- |
{layers}

## Hyper-parameters

| parameter | value |
| --- | --- |
{params}

## Validation

{metric_table}

## Use

```python
import otguard

model, tok = otguard.load_model("{ident.name_or_path}")
policy = otguard.Policy.from_pretrained("{uri}", model=model)  # checks the model identity
with policy.attach(model):
    out = model.generate(**tok("Q: ...", return_tensors="pt"), max_new_tokens=50)
```

From the command line: `otguard generate --model {ident.name_or_path} --policy {uri} --prompt "..."`
(add `@revision` to pin a commit, branch or tag).

## License

{license_note}
"""
    return "\n".join(meta_lines) + "\n" + body
