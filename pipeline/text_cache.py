"""umT5 embeddings cached per prompt: the text encoder runs once per distinct prompt.

    cache = TextEmbeddingCache(capacity=8)
    context, context_null = cache.encode(text_encoder, [req.prompt, req.negative_prompt], device=device)

A job's prompt and negative prompt are looked up separately; each one not cached is encoded on
its own (a batch of one, as the reference encodes them) and kept, least recently used first
out, up to `capacity` entries. An embedding is so a function of its key alone, never of the
prompt it happened to share a batch with: a job renders the same with a cold or a warm cache.
The key is (prompt, text_len, the encoder's dtype, the device the embeddings are wanted on):
an encoder kept on the CPU by the memory plan still hands back (and the cache keeps) tensors on
the device asked for, and a change of dtype or device never returns stale tensors.

The cached tensors are returned as they are, not copied: callers must not modify them in place
(the pipeline only reads them). Thread-safe: jobs on several threads may share one cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DEFAULT_CAPACITY = 8  # prompts; umT5-XXL: at most 512 x 4096 bf16 = 4 MiB each


@dataclass(frozen=True, slots=True)
class TextKey:
    prompt: str
    text_len: int
    dtype: torch.dtype
    device: torch.device


class TextEmbeddingCache:
    """LRU of `encode_text` results keyed by `TextKey`; counts hits, misses and encoder calls."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"text embedding cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[TextKey, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.encoder_calls = 0

    def encode(
        self, encoder: Any, prompts: Sequence[str], *, device: torch.device | str | None = None
    ) -> list[Tensor]:
        """prompts: B strings -> B tensors [L_i, D] on `device` (default: the encoder's), each
        as `encoder.encode_text([prompt])[0]` returns it.

        `encoder` is a `pipeline.models.t5.TextEncoder` (or a wrapper with its `encode_text`,
        `device`, `cfg.text_len` and `model`). Only the prompts not cached are encoded, one call
        each; a prompt given twice is encoded once.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError(
                f"TextEmbeddingCache.encode expects a non-empty list of strings, got {prompts!r}"
            )
        target = torch.device(device if device is not None else encoder.device)
        keys = [self._key(encoder, p, target) for p in prompts]
        with self._lock:
            found: dict[TextKey, Tensor] = {}
            for k in keys:
                if k in found:
                    continue
                if k in self._entries:
                    self.hits += 1
                    found[k] = self._entries[k]
                else:
                    self.misses += 1
                    self.encoder_calls += 1
                    found[k] = encoder.encode_text([k.prompt])[0].to(target)
            for k in keys:  # newest last; the oldest fall out
                self._entries[k] = found[k]
                self._entries.move_to_end(k)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return [found[k] for k in keys]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached embeddings (on their devices)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    def _key(encoder: Any, prompt: str, device: torch.device) -> TextKey:
        dtype = next(encoder.model.parameters()).dtype
        return TextKey(prompt, int(encoder.cfg.text_len), dtype, device)
