"""The text-embedding cache: umT5 runs once per distinct prompt, on the real tiny T5."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from daemon.jobs import load_job
from pipeline import InfiniteTalkPipeline, StopRequested
from pipeline.models.t5 import TextEncoder, load_t5
from pipeline.text_cache import TextEmbeddingCache, TextKey
from pipeline.tiny_encoders import tiny_t5_config
from pipeline.types import Progress
from tests.helpers.media import make_job_bundle


@pytest.fixture(scope="module")
def encoder(tiny_weights_dir: Path) -> TextEncoder:
    return load_t5(tiny_weights_dir, tiny_t5_config(), dtype=torch.float32)


class ForwardCount:
    """Counts forward passes of the real umT5 model (a forward pre-hook, nothing replaced)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.prompts = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        self.prompts += int(kwargs["input_ids"].shape[0])

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def count(encoder: TextEncoder) -> Iterator[ForwardCount]:
    counter = ForwardCount(encoder.model)
    yield counter
    counter.remove()


def test_returns_the_same_tensors_and_encodes_once(encoder: TextEncoder, count: ForwardCount) -> None:
    cache = TextEmbeddingCache()
    first = cache.encode(encoder, ["a man is talking", ""])
    assert count.calls == 2 and count.prompts == 2  # one call per prompt, a batch of one each
    second = cache.encode(encoder, ["a man is talking", ""])
    assert count.calls == 2  # nothing encoded again
    assert all(a is b for a, b in zip(first, second, strict=True))  # the very same tensors
    for prompt, out in zip(["a man is talking", ""], first, strict=True):
        assert torch.equal(out, encoder.encode_text([prompt])[0])  # what the encoder gives alone
    assert (cache.hits, cache.misses, cache.encoder_calls) == (2, 2, 2)


def test_a_new_prompt_encodes_only_itself(encoder: TextEncoder, count: ForwardCount) -> None:
    cache = TextEmbeddingCache()
    cache.encode(encoder, ["the woman smiles", "blurry"])
    _, negative = cache.encode(encoder, ["a man is talking", "blurry"])
    assert count.calls == 3 and cache.hits == 1
    assert negative is cache.encode(encoder, ["the woman smiles", "blurry"])[1]
    same = cache.encode(encoder, ["twice", "twice"])  # a prompt given twice is encoded once
    assert same[0] is same[1] and count.calls == 4


def test_capacity_is_bounded_least_recently_used_out(encoder: TextEncoder, count: ForwardCount) -> None:
    cache = TextEmbeddingCache(capacity=2)
    cache.encode(encoder, ["one"])
    cache.encode(encoder, ["two"])
    cache.encode(encoder, ["one"])  # "one" is now the most recent
    cache.encode(encoder, ["three"])  # evicts "two"
    assert len(cache) == 2 and count.calls == 3
    cache.encode(encoder, ["one"])
    assert count.calls == 3  # still cached
    cache.encode(encoder, ["two"])
    assert count.calls == 4  # was evicted, encoded again
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.encode(encoder, ["one", "two"]))
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        TextEmbeddingCache(capacity=0)
    with pytest.raises(ValueError, match="non-empty list"):
        cache.encode(encoder, "a bare string")


def test_key_names_text_len_dtype_and_device(encoder: TextEncoder, tiny_weights_dir: Path) -> None:
    cache = TextEmbeddingCache()
    (out,) = cache.encode(encoder, ["hello"], device="cpu")
    assert TextKey("hello", encoder.cfg.text_len, torch.float32, torch.device("cpu")) in cache
    half = load_t5(tiny_weights_dir, tiny_t5_config(), dtype=torch.bfloat16)
    (out_half,) = cache.encode(half, ["hello"])  # another dtype: its own entry, never the fp32 one
    assert out_half.dtype == torch.bfloat16 and out.dtype == torch.float32 and len(cache) == 2


def test_threads_share_one_cache(encoder: TextEncoder, count: ForwardCount) -> None:
    cache = TextEmbeddingCache()
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.encode(encoder, ["shared"])[0]))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count.calls == 1 and all(r is results[0] for r in results)


def test_second_job_with_the_same_prompt_does_not_run_umt5(tiny_weights_dir: Path, tmp_path: Path) -> None:
    """Through `InfiniteTalkPipeline.render`: each job stops at its first progress report, right
    after the text stage, so the test costs no denoising and no VAE."""
    pipe = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32)
    bundle = make_job_bundle(tmp_path / "job", duration_s=1.4, sample_steps=1, seed=3, prompt="A man talks.")
    prepared = pipe.prepare(load_job(bundle / "job.json").to_request(bundle), tmp_path / "work")
    count = ForwardCount(pipe.text_encoder.model)
    for i, prompt in enumerate(["A man talks.", "A man talks.", "A woman sings."]):
        job = replace(prepared, request=replace(prepared.request, prompt=prompt))
        with pytest.raises(StopRequested):
            pipe.render(job, tmp_path / f"out{i}.mp4", on_progress=_stop, resume=False)
        assert count.calls == [2, 2, 3][i], f"job {i}: umT5 ran {count.calls} times in all"
    count.remove()
    assert pipe.text_cache.hits == 3 and len(pipe.text_cache) == 3  # 2 prompts + the negative


def _stop(progress: Progress) -> None:
    raise StopRequested(f"test stops at {progress.stage}")
