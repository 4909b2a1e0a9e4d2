"""Process body for the sequence-parallel tests: one rank of a gloo group runs the tiny DiT.

Each rank loads the tiny weights, switches `sequence_parallel` on, runs every case of
`cases()` and saves its outputs (and its collective counters) to `<out_dir>/rank<r>.pt`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.dit import make_inputs

#: (name, speakers, latent frames, batch, rope mode): 3 frames split unevenly (2 + 1) over 2 ranks
CASES: tuple[tuple[str, int, int, int, str], ...] = (
    ("one_speaker", 1, 3, 1, "exact"),
    ("two_speakers", 2, 3, 1, "exact"),
    ("two_speakers_even_batch2_fast", 2, 4, 2, "fast"),
)


def load_model(weights_dir: Path):
    from pipeline.config import load_model_config
    from pipeline.weights import load_dit

    cfg = load_model_config(weights_dir).dit
    model = load_dit(weights_dir, cfg, variant="multi", dtype=torch.float32, attention_backend="sdpa")
    return cfg, model


def run_cases(model, cfg) -> dict[str, torch.Tensor]:
    outputs = {}
    with torch.no_grad():
        for name, speakers, frames, batch, rope in CASES:
            model.rope_mode = rope
            outputs[name] = model(
                **make_inputs(cfg, speakers=speakers, frames=frames, batch=batch, background_row=True)
            )
    return outputs


def rank_main(rank: int, world_size: int, port: int, weights_dir: str, out_dir: str) -> None:
    from pipeline import parallel

    torch.set_num_threads(1)
    parallel.init_group(
        parallel.Rendezvous(rank=rank, world_size=world_size, local_rank=rank, master_port=port),
        backend="gloo",
    )
    try:
        cfg, model = load_model(Path(weights_dir))
        sp = parallel.SequenceParallel()
        model.sequence_parallel = sp
        outputs = run_cases(model, cfg)
        stats = torch.tensor([sp.stats.calls, sp.stats.bytes_sent], dtype=torch.int64)
        torch.save({"outputs": outputs, "stats": stats}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        parallel.close_group()
