"""Config layering and rejection of bad input."""

import pytest

from trgl_dist import cli
from trgl_dist.config import (
    Config,
    ConfigError,
    default_lr,
    from_mapping,
    load_toml,
    module_epochs,
    to_mapping,
    write_toml,
)


def test_defaults_then_toml_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nmodules = 8\nname = "resnet110"\n[optim]\nlr = 0.5\n')
    config, _ = cli.parse(["--config", str(path), "--modules", "2", "--split-counts", "30,24"])
    assert config.model.modules == 2  # flag beats file
    assert config.model.name == "resnet110"  # file beats default
    assert config.optim.lr == 0.5
    assert config.model.split_counts == (30, 24)
    assert config.data.batch_size == Config().data.batch_size


def test_resolved_config_round_trips(tmp_path):
    config = Config().replace("method", tau_schedule="list", tau_values=(0.1, 0.2, 0.3, 0.4))
    write_toml(config, tmp_path / "config.toml")
    assert load_toml(tmp_path / "config.toml") == config
    assert to_mapping(config)["schema_version"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nonsense", "1"], "unrecognized arguments"),
        (["--modules", "0"], "model.modules"),
        (["--modules", "two"], "model.modules"),
        (["--method", "magic"], "method.name"),
        (["--buffer-policy", "lifo"], "pipeline.buffer_policy"),
        (["--tau", "-1"], "method.tau"),
        (["--regime", "async"], "train.regime"),
        (["--tau-schedule", "list", "--tau-values", "1,2"], "method.tau_values"),
    ],
)
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.parse(argv)


def test_unknown_toml_key_and_section_rejected(tmp_path):
    with pytest.raises(ConfigError, match="model.depth"):
        from_mapping({"model": {"depth": 3}})
    with pytest.raises(ConfigError, match="section 'trainer'"):
        from_mapping({"trainer": {"epochs": 3}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    old = tmp_path / "old.toml"
    old.write_text("schema_version = 0\n")
    with pytest.raises(ConfigError, match="schema 0"):
        load_toml(old)


def test_paper_learning_rates_and_module_budget():
    c = Config().replace("model", name="resnet110")
    assert default_lr(c.replace("train", regime="e2e")) == 0.1
    assert default_lr(Config()) == 0.05  # the CPU demo model
    assert default_lr(c.replace("train", regime="sequential")) == 0.007
    assert default_lr(c.replace("data", batch_size=256)) == 0.003
    assert default_lr(c.replace("data", batch_size=64)) == 0.002
    assert default_lr(c.replace("optim", lr=0.05)) == 0.05
    budget = c.replace("train", module_epochs_base=2, module_epochs_slope=1).train
    assert module_epochs(budget, 3) == [3, 4, 5]


def test_max_steps_without_epochs_plans_enough_epochs():
    from trgl_dist.config import TrainConfig, planned_epochs

    assert planned_epochs(TrainConfig(), 10) == 1
    assert planned_epochs(TrainConfig(max_steps=60), 4) == 15
    assert planned_epochs(TrainConfig(max_steps=60, epochs=2), 4) == 2
    assert module_epochs(TrainConfig(max_steps=9), 2, 4) == [3, 3]


@pytest.mark.parametrize("command", ["train", "plan"])
def test_every_flag_has_a_sentence_of_help(command: str) -> None:
    from trgl_dist.plan import _parser

    parser = cli.build_parser() if command == "train" else _parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 40
    for action in flags:
        text = (action.help or "").split(" (default", 1)[0].strip()
        words = text.split()
        assert len(words) >= 3, (action.option_strings, action.help)
        assert text.rstrip(")").endswith("."), (action.dest, text)
        assert "." not in action.dest or action.dest not in text, text  # not the bare key
