"""Settings: the shipped YAML files, unknown keys, and the precedence of file, environment and CLI.

configs/default.yaml and the configuration table in docs/configuration.md are generated from the
settings tree; after changing a field, regenerate them with

    .venv/bin/python tests/test_settings.py yaml > configs/default.yaml
    .venv/bin/python tests/test_settings.py markdown     # paste over the table in docs/configuration.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from llmos.cli import app
from llmos.settings import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
REGENERATE = "regenerate it with: .venv/bin/python tests/test_settings.py yaml > configs/default.yaml"

YAML_HEADER = """\
# llmos embedded default configuration: every key with its default and meaning.
# Generated from llmos/settings.py by tests/test_settings.py, which also checks that the two agree.
# Precedence, highest first: command-line options, LLMOS_* environment variables
# (nested keys joined with '__', e.g. LLMOS_SERVER__PORT=9000), this file, the built-in defaults.
# An unknown key is an error that names it.
"""


# ---- the settings tree, walked ----------------------------------------------------------------


def leaves(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, FieldInfo, Any]]:
    """(dotted key, field, default) for every leaf of the settings tree, in declaration order."""
    for name, f in model.model_fields.items():
        if isinstance(f.default, BaseModel):
            yield from leaves(type(f.default), f"{prefix}{name}.")
        else:
            yield prefix + name, f, f.get_default(call_default_factory=True)


def _scalar(value: Any, f: FieldInfo) -> str:
    if f.annotation is float and isinstance(value, int):
        value = float(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return yaml.safe_dump(value).split("\n")[0]  # keeps the '.' YAML 1.1 needs to read a float
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Path) and not value.is_absolute():
        return json.dumps(f"./{value}")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_scalar(v, FieldInfo()) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def render_default_yaml() -> str:
    lines = [YAML_HEADER.rstrip("\n")]

    def section(model: type[BaseModel], instance: BaseModel | None, indent: str) -> None:
        for name, f in model.model_fields.items():
            value = getattr(instance, name) if instance is not None else f.default
            if isinstance(value, BaseModel):
                if not indent:
                    lines.append("")
                if f.description:
                    lines.append(f"{indent}# {f.description}")
                lines.append(f"{indent}{name}:")
                section(type(value), value, indent + "  ")
            else:
                if not indent:
                    lines.append("")
                lines.append(f"{indent}# {f.description}")
                lines.append(f"{indent}{name}: {_scalar(value, f)}")

    section(Settings, None, "")
    return "\n".join(lines) + "\n"


def render_markdown_table() -> str:
    rows = ["| Key | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for key, f, default in leaves():
        env = "LLMOS_" + key.upper().replace(".", "__")
        shown = "unset" if default is None else f"`{_scalar(default, f).strip(chr(34))}`"
        meaning = (f.description or "").replace("|", "\\|").replace("*", "\\*")
        meaning = meaning.replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{key}` | `{env}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LLMOS_* variable from the caller's shell leaks in, and a stray ./llmos-data lands in tmp."""
    for name in list(os.environ):
        if name.startswith("LLMOS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- the shipped files ------------------------------------------------------------------------


def test_every_field_has_a_one_line_description() -> None:
    for key, f, _ in leaves():
        assert f.description and "\n" not in f.description, f"{key} needs a one-line description"


def test_default_yaml_equals_the_built_in_defaults() -> None:
    loaded = load_settings(CONFIGS / "default.yaml").model_dump()
    assert loaded == Settings().model_dump(), f"configs/default.yaml differs from llmos/settings.py; {REGENERATE}"


def test_default_yaml_documents_every_field_with_its_description() -> None:
    lines = {line.strip() for line in (CONFIGS / "default.yaml").read_text(encoding="utf-8").splitlines()}
    for key, f, _ in leaves():
        assert f"# {f.description}" in lines, f"configs/default.yaml lacks the comment for {key}; {REGENERATE}"


def test_configuration_doc_documents_every_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key, _, _ in leaves():
        assert f"| `{key}` |" in doc, (
            f"docs/configuration.md's table lacks {key}: paste the output of "
            ".venv/bin/python tests/test_settings.py markdown over it"
        )


def test_gpu_yaml_loads() -> None:
    s = load_settings(CONFIGS / "gpu.yaml")
    assert s.model.device == "cuda"
    assert s.model.precision == "bf16"
    assert s.model.name_or_path != "builtin:tiny"


# ---- unknown keys and bad values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("trian:\n  passes_per_batch: 4\n", "trian"),
        ("train:\n  lrr: 1\n", "train.lrr"),
        ("server:\n  port: 8000\n  hots: 0.0.0.0\n", "server.hots"),
    ],
)
def test_unknown_key_in_yaml_is_an_error_naming_it(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_settings(write(tmp_path / "c.yaml", yaml_text))


def test_unknown_nested_key_in_environment_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_TRAIN__LRR", "1")
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_settings()


def test_unknown_override_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="unknown key 'server.prot'"):
        load_settings(None, **{"server.prot": 9000})


def test_bad_value_names_the_full_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="'train.passes_per_batch'"):
        load_settings(write(tmp_path / "c.yaml", "train:\n  passes_per_batch: 0\n"))
    with pytest.raises(ConfigError, match="'server.port'"):
        load_settings(None, **{"server.port": 70000})
    monkeypatch.setenv("LLMOS_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match="'server.port'"):
        load_settings()


def test_fsdp_is_refused_with_what_it_cannot_train_yet() -> None:
    assert load_settings(None, **{"train.parallel": "fsdp"}).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.mode full"):
        load_settings(None, **{"train.parallel": "fsdp", "train.mode": "lora"})
    with pytest.raises(ConfigError, match="regularization.method none"):
        load_settings(None, **{"train.parallel": "fsdp", "regularization.method": "l2sp"})


def test_environment_value_that_is_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_SERVER", "not json")
    with pytest.raises(ConfigError, match="server"):
        load_settings()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [("- a\n- b\n", "mapping"), ("train: [unclosed\n", "not valid YAML")],
)
def test_malformed_file_is_a_config_error(tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path / "c.yaml", yaml_text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path / "c.yaml", "")).model_dump() == Settings().model_dump()


# ---- precedence: defaults < YAML < LLMOS_* environment < explicit overrides -------------------


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "c.yaml",
        "data_dir: /from/yaml\n"
        "auth:\n  admin_token: yaml-token\n"
        "server:\n  port: 9001\n"
        "train:\n  passes_per_batch: 3\n  block_size: 64\n",
    )


def test_yaml_overrides_defaults(yaml_file: Path) -> None:
    s = load_settings(yaml_file)
    assert (s.train.passes_per_batch, s.train.block_size, s.data_dir) == (3, 64, Path("/from/yaml"))
    assert s.train.micro_batch == Settings().train.micro_batch


def test_environment_overrides_yaml_key_by_key(yaml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_TRAIN__PASSES_PER_BATCH", "5")
    s = load_settings(yaml_file)
    assert s.train.passes_per_batch == 5
    assert s.train.block_size == 64  # the rest of the YAML section stays


def test_environment_takes_json_for_a_whole_section(yaml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_SERVER", '{"host": "0.0.0.0", "port": 9002}')
    s = load_settings(yaml_file)
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9002)


def test_explicit_overrides_outrank_environment(yaml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_TRAIN__PASSES_PER_BATCH", "5")
    monkeypatch.setenv("LLMOS_DATA_DIR", "/from/env")
    monkeypatch.setenv("LLMOS_SERVER__HOST", "0.0.0.0")
    overrides: dict[str, Any] = {
        "train.passes_per_batch": 7,
        "data_dir": Path("/from/cli"),
        "server.host": None,  # None means "not given"
    }
    s = load_settings(yaml_file, **overrides)
    assert s.train.passes_per_batch == 7
    assert s.data_dir == Path("/from/cli")
    assert s.server.host == "0.0.0.0"
    assert s.server.port == 9001


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMOS_DATA_DIR", str(tmp_path / "d"))
    s = load_settings()
    assert s.data_dir == tmp_path / "d"
    assert s.store_url == f"sqlite:///{tmp_path / 'd' / 'llmos.db'}"


def test_admin_token_from_environment(yaml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(yaml_file).auth.admin_token == "yaml-token"
    monkeypatch.setenv("LLMOS_AUTH__ADMIN_TOKEN", "nested-token")
    assert load_settings(yaml_file).auth.admin_token == "nested-token"
    monkeypatch.setenv("LLMOS_ADMIN_TOKEN", "env-token")  # the shorthand wins over the nested name
    assert load_settings(yaml_file).auth.admin_token == "env-token"
    assert load_settings(yaml_file, **{"auth.admin_token": "cli-token"}).auth.admin_token == "cli-token"


def test_llmos_config_names_the_file(yaml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_CONFIG", str(yaml_file))
    assert load_settings().train.passes_per_batch == 3
    other = write(tmp_path / "other.yaml", "train:\n  passes_per_batch: 2\n")
    assert load_settings(other).train.passes_per_batch == 2  # an explicit path wins over LLMOS_CONFIG


# ---- the command line -------------------------------------------------------------------------


def test_serve_with_unknown_key_exits_with_a_message(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "train:\n  lrr: 1\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert "unknown key 'train.lrr'" in result.output
    assert not (tmp_path / "llmos-data").exists()  # nothing started


def test_serve_with_bad_environment_exits_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_SERVER", "not json")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "server" in result.output


def test_serve_with_bad_config_prints_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "serving:\n  max_concurency: 2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "llmos", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'serving.max_concurency'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "yaml"
    sys.stdout.write(render_markdown_table() if what == "markdown" else render_default_yaml())
