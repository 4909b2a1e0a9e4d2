"""daemon/config.py: defaults, TOML loading, errors naming the key, generated docs up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, Settings, load_settings, render_markdown, render_toml

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, environ={})
    assert s.max_queued == 20 and s.max_running == 3
    assert s.dashboard.host == "127.0.0.1" and s.dashboard.port == 8000
    assert s.state_dir == tmp_path / "var"
    assert s.ledger_path == tmp_path / "var" / "ledger.sqlite3"
    assert s.config_file is None


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "it.toml"
    conf.parent.mkdir()
    conf.write_text(
        'inbox = "../in"\nstate_dir = "/abs/state"\nmax_queued = 5\n[dashboard]\nport = 9001\n'
        "[defaults]\nsample_steps = 2\nseed = 7\n"
    )
    s = load_settings(conf, environ={})
    assert s.inbox == tmp_path / "in"
    assert s.state_dir == Path("/abs/state")
    assert s.max_queued == 5 and s.dashboard.port == 9001
    assert s.defaults.sample_steps == 2 and s.defaults.seed == 7
    assert s.job_defaults().sample_steps == 2 and s.job_defaults().seed == 7  # also `render`


def test_environment_variable_then_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_conf = tmp_path / "env.toml"
    env_conf.write_text("max_running = 1\n")
    (tmp_path / "infinitetalk.toml").write_text("max_running = 2\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, environ={"INFINITETALK_CONFIG": str(env_conf)}).max_running == 1
    assert load_settings(None, environ={}).max_running == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("max_queud = 3\n", "max_queud: unknown key"),
        ("[dashboard]\nprot = 1\n", "dashboard.prot: unknown key"),
        ('max_queued = "many"\n', "max_queued must be an integer, got 'many'"),
        ("max_running = 0\n", "max_running must be > 0"),
        ('quant = "int4"\n', "quant must be one of auto, none, fp8, got 'int4'"),
        ("settle_s = -1\n", "settle_s must be >= 0"),
        ("max_queued = \n", "not valid TOML"),
        ('[defaults]\nsize = "1080p"\n', "defaults.size must be one of"),
        ("dashboard = 3\n", "[dashboard] must be a table"),
        ("[defaults]\napg_momentum = 1.5\n", "defaults.apg_momentum must be <= 1, got 1.5"),
        ("[defaults]\napg_momentum = -2\n", "defaults.apg_momentum must be >= -1"),
        ('[defaults]\nuse_apg = "yes"\n', "defaults.use_apg must be true or false"),
        (
            '[performance]\nfp8_attention = "maybe"\n',
            "performance.fp8_attention must be one of auto, on, off",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_settings(conf, environ={})
    assert needle in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_printed_config_round_trips(tmp_path: Path) -> None:
    conf = tmp_path / "printed.toml"
    conf.write_text(render_toml(Settings()))
    s = load_settings(conf, environ={})
    assert s.max_queued == 20 and s.defaults.sample_shift == 2.0 and s.defaults.seed is None


def test_configuration_doc_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == render_markdown(), "regenerate with: python -m daemon.config > docs/configuration.md"


def test_fp8_attention_setting_resolves_per_worker() -> None:
    from pipeline.perf import resolve_fp8_attention

    assert resolve_fp8_attention("on", fp8=False, device="cuda:0")[0] is True  # the load then
    # fails with the reason where it cannot run
    assert resolve_fp8_attention("off", fp8=True, device="cuda:0") == (False, None)
    assert resolve_fp8_attention("auto", fp8=False, device="cuda:0") == (False, None)  # bf16 weights
    cpu = "fp8 attention needs a CUDA device, got cpu"
    assert resolve_fp8_attention("auto", fp8=True, device="cpu") == (False, cpu)  # off, logged
    with pytest.raises(ValueError, match="fp8_attention must be auto, on or off, got 'yes'"):
        resolve_fp8_attention("yes", fp8=True, device="cuda:0")
