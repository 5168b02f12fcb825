"""A deterministic bag-of-words sentence embedder for the judge and scorer tests (no model download)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch


class BagOfWords:
    """Hashed bag of lower-cased words, L2-normalised (zero vector for texts without words)."""

    name_or_path = "bow"

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)
