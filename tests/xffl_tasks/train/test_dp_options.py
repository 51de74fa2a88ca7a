"""The dp_* training options: flags, cross-field rules, refused combinations, and the run's
sample rate and delta. Pure; starts nothing (the bad-flag cases run the task's ``main`` in
this process, which stops before anything loads)."""

from __future__ import annotations

import pytest

from xffl_tasks.train.__main__ import main, parse_arguments
from xffl_tasks.train.config import ConfigError, TrainingConfig
from xffl_tasks.train.dp_options import check_dp_options, default_delta, plan_privacy

PATHS = ["--model", "/m", "--data", "/d", "--out", "/o"]


def test_flags_set_the_dp_fields():
    config = parse_arguments(
        PATHS + ["--dp-mode", "dp-sgd", "--dp-target-epsilon", "8", "--dp-max-grad-norm", "0.5",
                 "--dp-delta", "1e-6", "--dp-accountant", "prv"]
    )  # fmt: skip
    assert (config.dp_mode, config.dp_target_epsilon, config.dp_noise_multiplier) == ("dp-sgd", 8.0, None)
    assert (config.dp_max_grad_norm, config.dp_delta, config.dp_accountant) == (0.5, 1e-6, "prv")
    plain = parse_arguments(PATHS)
    assert (plain.dp_mode, plain.dp_max_grad_norm, plain.dp_accountant) == ("none", 1.0, "rdp")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-mode", "dp-sgd"], "--dp-noise-multiplier / --dp-target-epsilon: --dp-mode dp-sgd needs exactly one (neither was given)"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--dp-target-epsilon", "3"], "needs exactly one (both were given)"),
        (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier: only with --dp-mode dp-sgd (dp_mode is 'none')"),
        (["--dp-delta", "1e-6"], "--dp-delta: only with --dp-mode dp-sgd"),
        (["--dp-accountant", "prv"], "--dp-accountant: only with --dp-mode dp-sgd"),
        (["--dp-max-grad-norm", "2"], "--dp-max-grad-norm: only with --dp-mode dp-sgd"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--parallelism", "fsdp"],
         "--dp-mode dp-sgd with --parallelism fsdp: refused"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--gradient-checkpointing"],
         "--dp-mode dp-sgd with --gradient-checkpointing: refused"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--precision", "bf16"],
         "--dp-mode dp-sgd with --precision bf16: refused"),
        (["--dp-mode", "dp"], "--dp-mode: 'dp' is not one of none, dp-sgd"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "-1"], "--dp-noise-multiplier: must be at least 0"),
        (["--dp-mode", "dp-sgd", "--dp-target-epsilon", "0"], "--dp-target-epsilon: must be greater than 0"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--dp-max-grad-norm", "0"], "--dp-max-grad-norm: must be greater than 0"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "1", "--dp-delta", "1.5"], "--dp-delta: must be at most 1"),
        (["--dp-mode", "dp-sgd", "--dp-noise-multiplier", "nan"], "--dp-noise-multiplier: must be a finite number"),
        (["--dp-accountant", "gdp"], "--dp-accountant: 'gdp' is not one of rdp, prv"),
    ],
)  # fmt: skip
def test_bad_dp_options_exit_2_naming_the_fields(flags, message, capsys):
    assert main(PATHS + flags) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_the_rules_hold_for_a_config_built_in_code():
    with pytest.raises(ConfigError, match="needs exactly one"):
        check_dp_options(TrainingConfig(dp_mode="dp-sgd"))
    check_dp_options(TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=0.0))
    check_dp_options(TrainingConfig(dp_mode="dp-sgd", dp_target_epsilon=1.0, parallelism="ddp"))
    check_dp_options(TrainingConfig())


def test_sample_rate_and_default_delta():
    config = TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=1.0, batch_size=4, gradient_accumulation=2)
    plan = plan_privacy(config, num_sequences=1722, world_size=2)
    assert plan.sample_rate == 16 / 1722
    assert plan.expected_batch == 16
    assert plan.delta == default_delta(1722) == 1 / 17220
    assert (plan.num_sequences, plan.world_size) == (1722, 2)
    given = plan_privacy(TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=1.0, dp_delta=1e-6),
                         num_sequences=1722, world_size=1)  # fmt: skip
    assert (given.delta, given.sample_rate) == (1e-6, 8 / 1722)
    whole = plan_privacy(TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=1.0, batch_size=4),
                         num_sequences=8, world_size=2)  # fmt: skip
    assert whole.sample_rate == 1.0


def test_a_batch_beyond_the_data_or_a_large_delta_is_refused():
    config = TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=1.0, batch_size=8)
    with pytest.raises(ConfigError, match=r"^--batch-size: .* = 16 is more than the 10 training sequences"):
        plan_privacy(config, num_sequences=10, world_size=2)
    large = TrainingConfig(dp_mode="dp-sgd", dp_noise_multiplier=1.0, dp_delta=0.001)
    with pytest.raises(ConfigError, match=r"^--dp-delta: 0.001 is not below 1/N = 1/1722"):
        plan_privacy(large, num_sequences=1722, world_size=1)
    with pytest.raises(ConfigError, match=r"^--dp-delta: 0.001 is not below 1/N = 1/1000"):
        plan_privacy(large, num_sequences=1000, world_size=1)
