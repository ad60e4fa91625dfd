"""train.lr_schedule: the rate of each step, logged and resumed."""
import math

import pytest
import torch

from reverse_voicefilter.core.errors import UserError
from reverse_voicefilter.core.hparams import HParam
from reverse_voicefilter.training.schedule import apply_schedule, rate_factor
from tests.test_trainer import data, read_events, train, write_config  # noqa: F401 (data: fixture)


def test_warmup_then_cosine_to_the_final_ratio():
    factors = [rate_factor(s, 4, 12, 0.1) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))  # falls monotonically after the warm-up
    assert rate_factor(12, 4, 12, 0.1) == pytest.approx(0.1) and rate_factor(99, 4, 12, 0.1) == pytest.approx(0.1)
    assert rate_factor(50, 4, 0, 0.1) == 1.0  # no max_steps: constant after the warm-up


def test_constant_leaves_the_optimizer_alone(tmp_path):
    hp = HParam(str(write_config(tmp_path / "c.yaml")))
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.123)
    apply_schedule(opt, hp, 0)
    assert opt.param_groups[0]["lr"] == 0.123


def test_bad_schedule_settings_are_refused(tmp_path):
    with pytest.raises(UserError, match="train.lr_schedule must be one of constant, warmup_cosine"):
        HParam(str(write_config(tmp_path / "a.yaml", {"train": {"lr_schedule": "linear"}})))
    with pytest.raises(UserError, match="lr_final_ratio"):
        HParam(str(write_config(tmp_path / "b.yaml", {"train": {"lr_final_ratio": 2.0}})))


def test_the_trainer_logs_the_scheduled_rate_and_a_resumed_run_continues_it(data):  # noqa: F811
    config = write_config(data / "sched.yaml", {"train": {"max_steps": 6, "checkpoint_interval": 3,
                                                           "lr_schedule": "warmup_cosine", "warmup_steps": 2,
                                                           "lr_final_ratio": 0.0}})
    assert train(data, "sched", config) == 0
    base = HParam(str(config)).train.adam
    logged = dict(read_events(data / "logs" / "sched")["learning_rate"])
    # the rate logged after step s is the one step s was taken with (step index s - 1)
    assert [logged[s] for s in range(1, 7)] == pytest.approx([base * rate_factor(s - 1, 2, 6, 0.0)
                                                              for s in range(1, 7)], rel=1e-6)
    assert train(data, "sched-resumed", config, "--checkpoint_path",
                 str(data / "chkpt" / "sched" / "chkpt_3.pt")) == 0
    straight = torch.load(data / "chkpt" / "sched" / "chkpt_6.pt", weights_only=True)["model"]
    resumed = torch.load(data / "chkpt" / "sched-resumed" / "chkpt_6.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
