"""`[performance] gpu_memory_gib` and `quant = "auto"`: defaults, accepted values, errors that
name the value, and what the render worker hands the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings, render_toml


def _load(tmp_path: Path, text: str):
    path = tmp_path / "infinitetalk.toml"
    path.write_text(text)
    return load_settings(path)


def test_defaults_are_auto(tmp_path: Path) -> None:
    s = _load(tmp_path, "")
    assert s.quant == "auto" and s.performance.gpu_memory_gib == "auto"
    assert 'gpu_memory_gib = "auto"' in render_toml(s) and 'quant = "auto"' in render_toml(s)


@pytest.mark.parametrize(("value", "expected"), [("24", 24.0), ("7.5", 7.5), ('"auto"', "auto")])
def test_accepted_budgets(tmp_path: Path, value: str, expected: object) -> None:
    s = _load(tmp_path, f"[performance]\ngpu_memory_gib = {value}\n")
    assert s.performance.gpu_memory_gib == expected
    assert load_settings(_write(tmp_path, render_toml(s))).performance.gpu_memory_gib == expected


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "again.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", ["0", "-3", '"lots"', "true", "1e9"])
def test_bad_budgets_name_the_value(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"performance\.gpu_memory_gib must be \"auto\" or a number"):
        _load(tmp_path, f"[performance]\ngpu_memory_gib = {value}\n")


def test_worker_hands_budget_and_quant_to_the_pipeline(tmp_path: Path, monkeypatch) -> None:
    """load_pipeline passes gpu_memory_gib and max_running (and never puts the budget into the
    speed settings, which would not accept it)."""
    import dataclasses

    from daemon import runner
    from pipeline.pipeline import InfiniteTalkPipeline

    seen: dict = {}

    class Loaded:  # a pipeline.types.Renderer
        def prepare(self, *args): ...

        def render(self, *args, **kwargs): ...

        def describe(self): ...

    def fake(weights_dir, opts):
        seen.update(quant=opts.quant, gpu_memory_gib=opts.gpu_memory_gib, max_running=opts.max_running)
        assert dict(opts.perf).keys().isdisjoint({"gpu_memory_gib", "warmup"})
        return Loaded()

    monkeypatch.setattr(InfiniteTalkPipeline, "load", staticmethod(fake))
    s = _load(tmp_path, "max_running = 2\n[performance]\ngpu_memory_gib = 12\n")
    config = runner.WorkerConfig(
        weights_dir=tmp_path,
        device="cpu",
        quant=s.quant,
        perf=tuple(dataclasses.asdict(s.performance).items()),
        max_running=s.max_running,
        warmup=False,
    )
    runner.load_pipeline(config)
    assert seen["gpu_memory_gib"] == 12.0 and seen["max_running"] == 2 and seen["quant"] == "auto"
