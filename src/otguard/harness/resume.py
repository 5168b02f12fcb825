"""Saved (fold, method) results: a long comparison survives a crash, a kill or a judge outage.

Each finished (fold, method) result is written atomically as ``OUT/partial/fold{k}-{method}.json``
the moment it is complete (metric values, the fold record, the CSV rows and the per-item values that
repair/harm and the paired bootstrap need), together with the key of the run that made it (a hash of the
configuration and of the loaded model's name and dtype). A rerun with the same configuration loads
the saved results and computes only the missing ones, so a ``kill -9`` loses at most the method in
progress. ``results.json`` is always assembled from these files, so a resumed run and an
uninterrupted one give the same numbers.

``OUT/partial/run.json`` records the configuration the saved results belong to: a rerun with a
different configuration is refused before any model work, with the settings that differ, unless it
is told to start over (``force``), which removes the saved results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otguard.errors import ConfigError
from otguard.harness.paired import ItemValues
from otguard.io import atomic_write_text
from otguard.results import FoldRecord

logger = logging.getLogger(__name__)

__all__ = ["PARTIAL_DIR", "PartialResult", "PartialStore"]

PARTIAL_DIR = "partial"
_RUN_FILE = "run.json"
_FORMAT = 2  # 2: per-item values; files of format 1 are computed again
_NAME_RE = re.compile(r"^fold(?P<fold>\d+)-(?P<method>.+)\.json$")
_MAX_DIFFS = 6


@dataclass
class PartialResult:
    """One method on one fold: metric values, the fold record, the CSV rows, the per-item values by
    item set and the judge's name."""

    fold: int
    method: str
    metrics: dict[str, float]
    record: FoldRecord
    rows: list[dict[str, Any]] = field(default_factory=list)
    judge_name: str = ""
    items: dict[str, ItemValues] = field(default_factory=dict)

    def to_dict(self, key: str) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "key": key,
            "fold": self.fold,
            "method": self.method,
            "judge": self.judge_name,
            # JSON has no NaN: a non-finite value is stored as null and read back as NaN.
            "metrics": {k: (float(v) if math.isfinite(float(v)) else None) for k, v in self.metrics.items()},
            "record": self.record.to_dict(),
            "rows": self.rows,
            "items": {k: v.to_dict() for k, v in self.items.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartialResult:
        if data.get("format") != _FORMAT:
            raise ValueError(f"saved by another otguard (format {data.get('format')!r}, this one {_FORMAT})")
        return cls(
            fold=int(data["fold"]),
            method=str(data["method"]),
            metrics={str(k): float("nan") if v is None else float(v) for k, v in data["metrics"].items()},
            record=FoldRecord.from_dict(data["record"]),
            rows=list(data.get("rows") or []),
            judge_name=str(data.get("judge") or ""),
            items={str(k): ItemValues.from_dict(v) for k, v in (data.get("items") or {}).items()},
        )


def _describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    shown = [f"{k}: {old.get(k)!r} saved, {new.get(k)!r} now" for k in keys[:_MAX_DIFFS]]
    if len(keys) > _MAX_DIFFS:
        shown.append(f"and {len(keys) - _MAX_DIFFS} more")
    return "; ".join(shown)


class PartialStore:
    """The ``partial/`` folder of one output folder, for one configuration.

    Built before any model work: it refuses saved results of another configuration (``force``
    removes them instead). :meth:`open` fixes the run key once the model is loaded; :meth:`load`
    returns the saved results of that key and :meth:`save` adds one.
    """

    def __init__(
        self, out_dir: Path, config: dict[str, Any], *, force: bool = False, force_hint: str = "--force"
    ) -> None:
        self.folder = Path(out_dir) / PARTIAL_DIR
        self.config = config
        self.force_hint = force_hint
        self.key: str | None = None
        if force:
            self.clear()
        saved = self._run_record()
        if saved is not None and saved.get("config") != config:
            diff = _describe_differences(saved.get("config") or {}, config)
            raise ConfigError(
                f"{self.folder.parent} holds saved results of another compare configuration ({diff}). "
                f"Rerun with the same settings to resume them, choose another output folder, or pass "
                f"{force_hint} to discard them and start over."
            )

    def _run_record(self) -> dict[str, Any] | None:
        path = self.folder / _RUN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} cannot be read ({exc}); pass {self.force_hint} to discard the saved results."
            ) from exc
        return data if isinstance(data, dict) else None

    def clear(self) -> None:
        """Remove the saved results (only the files this store writes)."""
        if not self.folder.is_dir():
            return
        removed = 0
        for path in self.folder.iterdir():
            if path.name == _RUN_FILE or _NAME_RE.match(path.name):
                path.unlink()
                removed += 1
        if not any(self.folder.iterdir()):
            shutil.rmtree(self.folder)
        if removed:
            logger.info("Discarded %d saved result file(s) in %s", removed, self.folder)

    def saved_pairs(self) -> set[tuple[int, str]]:
        """(fold, method) pairs with a saved file (any key): a cheap look before the model is loaded."""
        if not self.folder.is_dir():
            return set()
        found = (_NAME_RE.match(p.name) for p in self.folder.iterdir())
        return {(int(m["fold"]), m["method"]) for m in found if m}

    def open(self, model: dict[str, Any]) -> str:
        """Fix the run key from the configuration and the loaded ``model`` facts; returns the key.

        Saved results of the same configuration but another model (name or dtype) are refused.
        """
        saved = self._run_record()
        if saved is not None and saved.get("model") != model:
            diff = _describe_differences(saved.get("model") or {}, model)
            raise ConfigError(
                f"{self.folder.parent} holds saved results of the same configuration with another model "
                f"({diff}). Use the same --model/--dtype to resume them, or pass {self.force_hint} to "
                "discard them and start over."
            )
        text = json.dumps({"config": self.config, "model": model}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        if saved is None:
            record = {"format": _FORMAT, "key": self.key, "config": self.config, "model": model}
            atomic_write_text(self.folder / _RUN_FILE, json.dumps(record, indent=2, default=str))
        return self.key

    def load(self) -> dict[tuple[int, str], PartialResult]:
        """The saved results of this run's key; unreadable files are reported and recomputed."""
        if self.key is None:
            raise RuntimeError("PartialStore.open() must be called before load().")
        out: dict[tuple[int, str], PartialResult] = {}
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.iterdir()):
            if not _NAME_RE.match(path.name):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("key") != self.key:
                    raise ConfigError(
                        f"{path} belongs to another run (key {data.get('key')!r}, this run {self.key!r}); "
                        f"pass {self.force_hint} to discard the saved results and start over."
                    )
                result = PartialResult.from_dict(data)
            except ConfigError:
                raise
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                logger.warning("Ignoring unreadable saved result %s (%s); it is computed again.", path, exc)
                path.unlink(missing_ok=True)
                continue
            out[(result.fold, result.method)] = result
        return out

    def save(self, result: PartialResult) -> Path:
        """Write one finished result atomically (a kill never leaves half a file)."""
        if self.key is None:
            raise RuntimeError("PartialStore.open() must be called before save().")
        path = self.folder / f"fold{result.fold}-{result.method}.json"
        atomic_write_text(path, json.dumps(result.to_dict(self.key), default=str))
        return path
