"""Measure what running jobs side by side buys: the same N jobs through one resident worker,
all at once (max_running = N) versus one after another.

    python examples/measure_concurrency.py [--weights DIR] [--jobs 3] [--audio 3.0] [--steps 2]

Without --weights a tiny random-weight model is written to a temporary folder. The worker is the
daemon's own (`daemon.pool.WorkerHandle`, a spawned process holding one model); the daemon's
ledger and inbox are not involved, so the figure is about the render path only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.jobs import JobDefaults, parse_job  # noqa: E402
from daemon.pool import WorkerHandle  # noqa: E402
from daemon.protocol import Failed, Finished, RunOrder, Stopped  # noqa: E402
from daemon.runner import WorkerConfig  # noqa: E402
from examples.make_example import make_example  # noqa: E402


def run_batch(worker: WorkerHandle, orders: list[RunOrder], *, together: bool) -> float:
    started = time.perf_counter()
    pending = list(orders)
    running: set[str] = set()
    while pending or running:
        while pending and (together or not running):
            order = pending.pop(0)
            worker.run(order)
            running.add(order.job_id)
        worker.wait(0.05)
        for message in worker.poll():
            if isinstance(message, (Failed, Stopped)):
                raise RuntimeError(f"job {message.job_id} did not finish: {message}")
            if isinstance(message, Finished):
                running.discard(message.job_id)
        if not worker.alive():
            raise RuntimeError("worker died")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--audio", type=float, default=3.0, help="seconds of speech per job")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of each mode (best one counts)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="concurrency-"))
    weights = args.weights or tmp / "weights"
    config = WorkerConfig(
        weights_dir=weights, device=args.device, max_running=args.jobs, write_tiny=args.weights is None
    )
    worker = WorkerHandle(config)
    worker.start()
    while not worker.ready:
        if not worker.alive():
            raise SystemExit("worker failed to start")
        worker.wait(0.5)
        worker.poll()
    print(f"model loaded in {worker.info.get('load_s')} s on {worker.info.get('device')}")
    try:
        results = {}
        for mode in ("sequential", "together") * args.rounds:
            orders = []
            for i in range(args.jobs):
                bundle = make_example(tmp / f"{mode}-{i}-{time.time_ns()}", duration_s=args.audio)
                spec = parse_job(
                    (bundle / "job.json").read_bytes(),
                    base_dir=bundle,
                    defaults=JobDefaults(sample_steps=args.steps),
                )
                job_id = f"{mode[:3]}{i}{time.time_ns() % 10**6}"
                orders.append(
                    RunOrder(
                        job_id=job_id,
                        request=spec.to_request(bundle),
                        out_path=tmp / job_id / "out.mp4",
                        poster_path=tmp / job_id / "poster.jpg",
                        checkpoint_dir=tmp / job_id / "ckpt",
                    )
                )
            elapsed = run_batch(worker, orders, together=mode == "together")
            results.setdefault(mode, []).append(elapsed)
            print(f"{mode:<10} {args.jobs} jobs: {elapsed:.2f} s")
        seq, tog = min(results["sequential"]), min(results["together"])
        print(
            f"best of {args.rounds}: one after another {seq:.2f} s, side by side {tog:.2f} s, "
            f"{100 * (1 - tog / seq):.0f}% less wall time"
        )
    finally:
        worker.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
