"""train.log_with: tracker names are checked against accelerate's registry when the config loads."""

from __future__ import annotations

import pytest
from conftest import make_tiny_config

from racedit.config import ConfigError, log_with_names


def test_unknown_tracker_is_refused_when_the_config_loads(tmp_path):
    for value in ("tensorbord", "[tensorboard,wandbb]", "all"):
        with pytest.raises(ConfigError) as info:
            make_tiny_config(tmp_path, f"train.log_with={value}")
        msg = str(info.value)
        assert "\n" not in msg and "'train.log_with'" in msg and "'tensorboard'" in msg and "'none'" in msg
    with pytest.raises(ConfigError, match="'train.log_with'"):
        make_tiny_config(tmp_path, "train.log_with=3")


def test_one_name_a_list_comma_separated_or_none(tmp_path):
    names = lambda value: log_with_names(make_tiny_config(tmp_path, f"train.log_with={value}").train.log_with)
    assert names("tensorboard") == names("[tensorboard]") == names("tensorboard,tensorboard") == ["tensorboard"]
    assert names("none") == names("''") == names("[]") == names("null") == []
    assert names("[tensorboard,mlflow]") == names("tensorboard, mlflow") == ["tensorboard", "mlflow"]
