"""bench/roofline.py: the reference a training step is held to, and the fraction printed beside it."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reverse_voicefilter.bench import roofline


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_reference_is_one_convolution_forward_and_backward(precision):
    fn, flops = roofline.conv_training_reference(torch.device("cpu"), channels=4, frames=9, freq=11, batch=2,
                                                 precision=precision)
    with FlopCounterMode(display=False) as counter:
        fn()  # forward, input gradient, weight gradient
    assert counter.get_total_flops() == flops == 3 * 2 * 4 * 4 * 25 * 9 * 11 * 2
    fn()  # gradients are dropped after each call: the next one does the same work, not an accumulation


def test_same_time_fraction_is_the_step_rate_over_the_convolutions():
    results = {"bf16-cl": {"gflops": 500.0, "conv_train_gflops": 1000.0},
               "fp32": {"gflops": 100.0},                      # its reference did not run: no fraction
               "bf16": {"error": "timeout after 600 s"}}
    roofline.add_same_time_fraction(results)
    assert results["bf16-cl"]["of_conv_train"] == "50 %"
    assert "of_conv_train" not in results["fp32"] and "of_conv_train" not in results["bf16"]
