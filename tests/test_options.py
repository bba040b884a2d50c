"""Option and mode parsing: values, precedence, and one clear error per kind of mistake."""

from __future__ import annotations

import pytest

from difforge.errors import OptionsError
from difforge.options import (
    MODE_SETTINGS,
    MODES,
    PRESETS,
    mode_table_markdown,
    parse_mode,
    parse_options,
)


def test_default_is_o1_with_cleanup_passes_only() -> None:
    config = parse_options(None, env={})
    assert config.mode == "" and config.modes == ()
    assert config.pass_enabled("remove_dropout")
    assert not config.pass_enabled("fuse_qkv")
    assert config.inductor_patches() == {}
    assert not config.cache_enabled and not config.allow_tf32


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_sets_its_switches(mode: str) -> None:
    config = parse_options({"mode": mode}, env={})
    assert config.modes == (mode,)
    for key, value in MODE_SETTINGS[mode].items():
        if key.startswith(("inductor.", "functorch.")) and key not in config.settings:
            continue  # not in this torch version: skipped on purpose
        assert config.settings[key] == value, key


def test_presets_expand_and_combine_with_modes() -> None:
    assert parse_options({"mode": "O3"}, env={}).modes == (
        "max-optimize",
        "cudagraphs",
        "low-precision",
    )
    preset, modes = parse_mode("O2:cache-all")
    assert preset == "O2" and set(modes) == {"max-optimize", "cudagraphs", "cache-all"}
    assert set(PRESETS) == {"O1", "O2", "O3"}


def test_json_string_and_dict_are_equivalent() -> None:
    a = parse_options('{"mode": "max-optimize:freezing", "passes.fuse_qkv": false}', env={})
    b = parse_options({"mode": "max-optimize:freezing", "passes.fuse_qkv": False}, env={})
    assert a == b
    assert not a.pass_enabled("fuse_qkv")  # explicit override beats the mode


def test_dotted_override_beats_mode() -> None:
    config = parse_options(
        {"mode": "max-optimize", "inductor.coordinate_descent_tuning": False}, env={}
    )
    assert config.inductor_patches()["coordinate_descent_tuning"] is False
    assert config.inductor_patches()["aggressive_fusion"] is True


def test_unknown_mode_lists_valid_and_suggests() -> None:
    with pytest.raises(
        OptionsError, match=r"unknown mode 'max-autotun'.*did you mean 'max-autotune'"
    ):
        parse_options({"mode": "max-autotun"}, env={})
    with pytest.raises(OptionsError, match="valid modes: cache-all, max-autotune"):
        parse_options({"mode": "fast"}, env={})
    with pytest.raises(OptionsError, match="empty mode"):
        parse_options({"mode": "O2::cudagraphs"}, env={})


def test_unknown_keys_are_errors_with_suggestions() -> None:
    with pytest.raises(OptionsError, match=r"unknown option 'dynamc'.*did you mean 'dynamic'"):
        parse_options({"dynamc": True}, env={})
    with pytest.raises(OptionsError, match=r"has no setting 'max_autotun'.*'max_autotune'"):
        parse_options({"inductor.max_autotun": True}, env={})
    with pytest.raises(OptionsError, match=r"unknown pass 'fuse_qvk'.*'passes.fuse_qkv'"):
        parse_options({"passes.fuse_qvk": True}, env={})
    with pytest.raises(OptionsError, match="unknown option 'nonsense.key'"):
        parse_options({"nonsense.key": 1}, env={})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dynamic": "yes"}, "'dynamic' expects bool, got str"),
        ({"fullgraph": 1}, "'fullgraph' expects bool, got int"),
        ({"mode": 3}, "'mode' expects str"),
        ({"passes.fuse_qkv": "on"}, "'passes.fuse_qkv' expects bool"),
        ({"inductor.max_autotune": 1}, "'inductor.max_autotune' expects bool"),
        ({"inductor.max_fusion_size": True}, "expects int, got bool"),
        ({"memory_format": "nhwc"}, "memory_format' must be one of channels_last"),
        ({"cache.dir": 5}, "'cache.dir' expects str or null"),
        ({"compile.regional": "block"}, "one of nested, blocks; got 'block'; did you mean"),
        ({"recompile.limit": -3}, "'recompile.limit' must be an integer >= 0"),
    ],
)
def test_wrong_types_are_errors(options: dict, match: str) -> None:
    with pytest.raises(OptionsError, match=match):
        parse_options(options, env={})


def test_malformed_json_reports_position() -> None:
    with pytest.raises(OptionsError, match=r"not valid JSON.*line 1 column 15 \(char 14\)"):
        parse_options('{"mode": "O2",, }', env={})
    with pytest.raises(OptionsError, match="must be an object"):
        parse_options('["O2"]', env={})
    with pytest.raises(OptionsError, match="must be a dict, a JSON string, a mode string or None"):
        parse_options(42, env={})  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["O2", " O3 ", "max-autotune:cudagraphs", "O2:cache-all"])
def test_a_bare_mode_string_is_the_mode(text: str) -> None:
    assert parse_options(text, env={}) == parse_options({"mode": text.strip()}, env={})


def test_a_string_neither_json_nor_modes_names_both() -> None:
    with pytest.raises(OptionsError, match=r"not valid JSON \(or a mode such as 'O2'\)"):
        parse_options("O4", env={})
    with pytest.raises(OptionsError, match=r"not valid JSON \(or"):
        parse_options("O2:fast", env={})


def test_conflicts_are_errors() -> None:
    with pytest.raises(OptionsError, match="combines presets 'O2' and 'O3'"):
        parse_options({"mode": "O2:O3"}, env={})
    with pytest.raises(OptionsError, match="conflicting 'dynamic'"):
        parse_options({"dynamic": True}, dynamic=False, env={})
    with pytest.raises(OptionsError, match="'cache.dir' is set but caching is off"):
        parse_options({"cache.dir": "/tmp/x"}, env={})


def test_env_precedence_option_over_env_over_default(tmp_path) -> None:
    env = {"DIFFORGE_MODE": "O3"}
    assert parse_options(None, env=env).preset == "O3"
    assert parse_options({"mode": "O1"}, env=env).preset == "O1"

    env = {"DIFFORGE_GRAPH_CACHE": "1", "DIFFORGE_CACHE_DIR": str(tmp_path)}
    config = parse_options(None, env=env)
    assert config.cache_enabled and config.cache_dir == tmp_path
    assert not parse_options({"cache.enabled": False}, env=env).cache_enabled
    assert parse_options(None, env={"NEXFORT_GRAPH_CACHE": "1"}).cache_enabled
    # Inductor owns TORCHINDUCTOR_CACHE_DIR; ours is a folder inside it.
    config = parse_options(None, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert config.settings["cache.dir"] == str(tmp_path / "difforge")
    # torch writes its own default into the environment (importing difforge imports Dynamo):
    # that is no choice of the user's, and a root under /tmp would not survive a reboot.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    env = {"TORCHINDUCTOR_CACHE_DIR": torch_default(), "XDG_CACHE_HOME": str(tmp_path / "x")}
    config = parse_options({"mode": "cache-all"}, env=env)
    assert config.cache_dir == tmp_path / "x" / "difforge"
    with pytest.raises(OptionsError, match="DIFFORGE_GRAPH_CACHE='maybe' must be 1 or 0"):
        parse_options(None, env={"DIFFORGE_GRAPH_CACHE": "maybe"})
    with pytest.raises(OptionsError, match="unknown mode 'turbo'"):
        parse_options(None, env={"DIFFORGE_MODE": "turbo"})


def test_config_is_frozen_and_keyed() -> None:
    config = parse_options({"mode": "O2"}, env={})
    with pytest.raises(AttributeError):
        config.mode = "O3"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.settings["passes.fuse_qkv"] = False  # type: ignore[index]
    other = parse_options({"mode": "O2", "passes.fuse_qkv": False}, env={})
    assert config.key() != other.key()
    assert config.key() == parse_options({"mode": "O2"}, env={}).key()


def test_mode_table_names_every_mode_and_setting() -> None:
    table = mode_table_markdown()
    for mode, settings in MODE_SETTINGS.items():
        assert f"`{mode}`" in table
        for key in settings:
            assert key in table


def test_readme_mode_table_is_current() -> None:
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert mode_table_markdown() in readme.read_text(), "regenerate the README's mode table"


def test_a_bad_regional_style_fails_before_the_module_changes() -> None:
    """difforge.compile validates every option before it touches the module: a misspelt
    'compile.regional' used to be refused only when regions were built, after the conv
    weights had been re-laid channels_last and the input hook installed."""
    import torch

    import difforge

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(OptionsError, match="compile.regional"):
        difforge.compile(
            model, options={"memory_format": "channels_last", "compile.regional": "block"}
        )
    assert model[0].weight.is_contiguous()
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not hasattr(model, "_difforge_memory_format_hook")
    assert parse_options({"recompile.limit": None}, env={}).settings["recompile.limit"] is None
