"""A model's cost (cost.py): parameters, FLOPs, latency, measured without leaving a trace."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from raytune_ft.model import cost
from raytune_ft.runs import COST_KEYS


class _Noisy(nn.Module):
    """Draws random numbers in every forward pass, eval mode included (as no torchvision
    model does): the measurement must still leave the RNG where it was."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * torch.randn_like(x)


def _tiny() -> nn.Sequential:
    """8 px input: a 3x3 conv 3→4 (no bias) then a linear 256→10. FLOPs by hand:
    conv 2 * (4*8*8 outputs) * (3*3*3 MACs each) = 13_824; linear 2 * 256 * 10 = 5_120."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(), _Noisy(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(256, 10))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tiny_model_exact_flops_and_params() -> None:
    c = cost.measure(_tiny(), 8, cache=False)
    assert c.flops == 13_824 + 5_120
    assert c.params == 3 * 4 * 9 + 2 * 4 + 256 * 10 + 10
    assert 0 < c.latency_b1_ms < 1000 and 0 < c.latency_b32_ms < 1000
    # What the trainer reports is what run records read back (runs.py is torch-free).
    assert {*c.as_metrics(), "epoch_s"} == set(COST_KEYS)


def test_measuring_leaves_rng_weights_bn_stats_and_modes_as_they_were() -> None:
    model = _tiny()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model, as the trainer keeps them
    # Running stats that differ from their init, so a forward in train mode would move them.
    model[1].running_mean.fill_(0.3)
    before, modes = _state(model), [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    cost.measure(model, 8, cache=False)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    # …and the next random draw is the one it would have been with no measurement.
    torch.set_rng_state(rng)
    expected = torch.rand(3)
    torch.set_rng_state(rng)
    cost.measure(model, 8, cache=False)
    assert torch.equal(torch.rand(3), expected)


def test_resnet18_at_32px() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    before = _state(model)
    c = cost.measure(model, 32, cache=False)
    assert c.params == sum(p.numel() for p in model.parameters()) == 11_181_642
    # The convolutions and the fc layer at 32 px, as FlopCounterMode counts them (2 per MAC).
    assert c.flops == 74_033_152
    assert math.isfinite(c.latency_b1_ms) and c.latency_b32_ms > c.latency_b1_ms > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # restored


def test_resnet18_flops_at_224px_match_the_published_count() -> None:
    """torchvision lists resnet18 at 1.81 "GFLOPS", which are multiply-adds: 2x that here."""
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.inference_mode():
        flops = cost.count_flops(model, torch.zeros(1, 3, 224, 224))
    assert flops == pytest.approx(2 * 1.814e9, rel=0.01)


def test_identical_models_are_measured_once_per_process() -> None:
    def pooled(classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, classes))

    cost.clear_cache()
    calls: list[int] = []
    a, b = pooled(), pooled()
    for m in (a, b):
        m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    first = cost.measure(a, 8)
    n = len(calls)
    assert n >= 4 and calls[0] == 1 and 32 in calls  # FLOPs, warm-ups and timed runs
    assert first.flops == 2 * (4 * 8 * 8) * 27 + 2 * 4 * 10
    assert cost.measure(b, 8) is first and len(calls) == n  # same structure: cached
    assert cost.measure(b, 16).flops == 2 * (4 * 16 * 16) * 27 + 2 * 4 * 10  # another size
    assert len(calls) > n
    assert cost.measure(pooled(12), 8).params == first.params + 2 * 4 + 2  # another head
    cost.clear_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_autocast_and_channels_last_keeps_cuda_rng() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10).cuda()
    model = model.to(memory_format=torch.channels_last)
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    before = _state(model)
    c = cost.measure(model, 32, amp_dtype=torch.bfloat16, channels_last=True, cache=False)
    assert c.flops == 74_033_152 and c.latency_b32_ms > 0
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
