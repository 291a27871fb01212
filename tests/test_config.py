"""Settings: typed, from LOOPGATE_* variables, unknown or bad ones stop startup by name."""

from __future__ import annotations

import pytest

from service import SettingsError, create_app, load_settings


def test_defaults_and_lists() -> None:
    settings = load_settings({"LOOPGATE_PROJECT": "p", "LOOPGATE_TOPICS": "a, b,,c"})
    assert settings.project == "p"
    assert settings.topics == ("a", "b", "c")
    assert settings.eager is True
    assert settings.topic_allowed("b") and not settings.topic_allowed("d")
    assert load_settings({"LOOPGATE_PROJECT": "p", "LOOPGATE_TOPICS": "*"}).topic_allowed("any")
    assert not load_settings({"LOOPGATE_PROJECT": "p"}).topic_allowed("any")


def test_values_are_parsed() -> None:
    settings = load_settings(
        {"LOOPGATE_PROJECT": "p", "LOOPGATE_EAGER": "0", "LOOPGATE_PUBLISH_MAX_LATENCY": "0.02"}
    )
    assert settings.eager is False
    assert settings.publish_max_latency == 0.02


def test_unknown_variable_is_named() -> None:
    with pytest.raises(SettingsError, match="LOOPGATE_TOPCIS"):
        load_settings({"LOOPGATE_PROJECT": "p", "LOOPGATE_TOPCIS": "a"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOOPGATE_EAGER", "maybe"),
        ("LOOPGATE_PUBLISH_MAX_MESSAGES", "5000"),
        ("LOOPGATE_PUBLISH_MAX_LATENCY", "soon"),
        ("LOOPGATE_MAX_BODY_BYTES", "-1"),
    ],
)
def test_bad_value_is_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({"LOOPGATE_PROJECT": "p", name: value})


def test_missing_project_is_named() -> None:
    with pytest.raises(SettingsError, match="LOOPGATE_PROJECT"):
        load_settings({})


def test_create_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPGATE_PROJECT", "from-env")
    monkeypatch.setenv("LOOPGATE_AUTH", "disabled")
    monkeypatch.setenv("LOOPGATE_BOGUS", "1")
    with pytest.raises(SettingsError, match="LOOPGATE_BOGUS"):
        create_app()
    monkeypatch.delenv("LOOPGATE_BOGUS")
    app = create_app()
    assert app.extensions["loopclients"].config.project == "from-env"
