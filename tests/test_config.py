from pathlib import Path

import pytest

from a4ps.config import SettingsError, load_settings


def test_defaults_from_the_shipped_file():
    s = load_settings()
    assert s.models.backend == "embedded"
    assert s.models.persona_model("BRICK") == "smollm2-135m"
    assert s.bus.command_addr.startswith("tcp://127.0.0.1:")
    assert s.data_dir.is_absolute()


def test_env_overrides_nested_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("A4PS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("A4PS_BUS__COMMAND_ADDR", "tcp://127.0.0.1:6001")
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "ollama")
    s = load_settings()
    assert s.data_dir == tmp_path
    assert s.image_path == tmp_path / "live_image.dill"
    assert s.bus.command_addr == "tcp://127.0.0.1:6001"
    assert s.models.persona_model("BRICK") == "phi3:mini"


def test_invalid_env_value_names_the_key(monkeypatch):
    monkeypatch.setenv("A4PS_COGNITION__MAX_ROUNDS", "lots")
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "cognition.max_rounds" in str(e.value)


def test_invalid_file_value_names_the_key(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text("[cognition]\ndissonance_threshold = 3.5\n")
    with pytest.raises(SettingsError) as e:
        load_settings(cfg)
    assert "cognition.dissonance_threshold" in str(e.value)
    assert str(cfg) in str(e.value)


def test_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text("[bus]\ncomand_addr = 'tcp://127.0.0.1:1'\n")
    with pytest.raises(SettingsError) as e:
        load_settings(cfg)
    assert "bus.comand_addr" in str(e.value)


def test_broken_toml_and_missing_file(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text("[bus\n")
    with pytest.raises(SettingsError, match="invalid settings file"):
        load_settings(cfg)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_cli_reports_bad_settings(monkeypatch, capsys):
    from a4ps.cli import main
    monkeypatch.setenv("A4PS_BUS__MAX_MESSAGE_BYTES", "-1")
    assert main(["status"]) == 2
    assert "bus.max_message_bytes" in capsys.readouterr().err


def test_unreadable_settings_file_is_one_line(tmp_path, capsys):
    """Issue 13: an unreadable config gave a raw traceback."""
    from a4ps.cli import main
    for bad in (tmp_path / "a-directory", tmp_path / "latin1.toml"):
        if bad.suffix:
            bad.write_bytes(b"[bus]\ncommand_addr = '\xe9'\n")
        else:
            bad.mkdir()
        assert main(["--config", str(bad), "status"]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_invalid_values_are_reported_on_one_line(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text("[bus]\nmax_message_bytes = -1\nheartbeat_interval_s = 'x'\n")
    with pytest.raises(SettingsError) as e:
        load_settings(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "bus.max_message_bytes" in msg and "bus.heartbeat_interval_s" in msg
