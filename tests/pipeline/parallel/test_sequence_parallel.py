"""Ulysses sequence parallelism of the DiT on CPU: 2 gloo processes equal one process.

The tiny DiT has 2 heads, so the degree is 2. Cases cover one and two speakers (the two-speaker
region map needs frame 0's keys from rank 0 and the group's min/max), an uneven frame split
(3 latent frames -> 2 + 1), batch 2 and both RoPE modes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import parallel
from tests.pipeline.parallel import sp_worker

#: float32 relative L2 error bound between the 2-process and the 1-process velocity
#: (only the summation order of matmuls over fewer rows differs; measured ~1e-7).
BOUND = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def two_rank_outputs(tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sp")
    parallel.spawn(sp_worker.rank_main, 2, (str(tiny_weights_dir), str(out)))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single_outputs(tiny_weights_dir: Path) -> dict[str, torch.Tensor]:
    cfg, model = sp_worker.load_model(tiny_weights_dir)
    return sp_worker.run_cases(model, cfg)


@pytest.mark.parametrize("case", [c[0] for c in sp_worker.CASES])
def test_two_ranks_equal_one_process(two_rank_outputs, single_outputs, case: str) -> None:
    expected = single_outputs[case]
    for rank, result in enumerate(two_rank_outputs):
        got = result["outputs"][case]
        assert got.shape == expected.shape, (rank, got.shape, expected.shape)
        err = rel(got, expected)
        assert err < BOUND, f"rank {rank} {case}: relative error {err:.2e}"


def test_ranks_really_communicated(two_rank_outputs, tiny_weights_dir: Path) -> None:
    cfg, _ = sp_worker.load_model(tiny_weights_dir)
    calls, sent = (int(v) for v in two_rank_outputs[0]["stats"])
    # per block: 2 all-to-alls; two-speaker cases add a broadcast and an all-reduce; 1 gather per forward
    per_forward = [
        cfg.num_layers * (2 + (2 if speakers == 2 else 0)) + 1 for _, speakers, *_ in sp_worker.CASES
    ]
    assert calls == sum(per_forward)
    assert sent > 0


def test_two_speakers_depend_on_the_speaker_map(single_outputs) -> None:
    # guards the cases above: the two-speaker output is not the one-speaker one
    assert rel(single_outputs["two_speakers"], single_outputs["one_speaker"]) > 1e-3


def test_frame_split() -> None:
    assert parallel.frame_split(21, 2) == (11, 10)
    assert parallel.frame_split(21, 8) == (3, 3, 3, 3, 3, 2, 2, 2)
    assert parallel.frame_split(4, 4) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="3 latent frames cannot be split over 4"):
        parallel.frame_split(3, 4)


def test_degree_must_divide_the_heads() -> None:
    for ok in (1, 2, 4, 5, 8):
        parallel.check_degree(40, ok)
    with pytest.raises(ValueError, match="degree 3 does not divide the 40 heads"):
        parallel.check_degree(40, 3)


def test_rendezvous_from_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.Rendezvous.from_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29611")
    rdv = parallel.Rendezvous.from_env()
    assert rdv == parallel.Rendezvous(rank=3, world_size=4, local_rank=1, master_port=29611)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="four"):
        parallel.Rendezvous.from_env()
