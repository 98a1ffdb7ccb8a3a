import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avatarserve.model.sampler import FlowMatchSchedule


def test_live_avatar_timesteps():
    s = FlowMatchSchedule.create(4, 3.0, 1000)
    assert s.timesteps == pytest.approx((1000.0, 857.6923, 602.1506, 8.9286), abs=1e-3)
    assert s.sigmas == pytest.approx((1.0, 0.857692, 0.602151, 0.008929, 0.0), abs=1e-5)


@pytest.mark.parametrize("steps,shift", [(4, 3.0), (2, 3.0), (6, 5.0)])
def test_equals_diffusers_scheduler(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    s = FlowMatchSchedule.create(steps, shift)
    assert list(s.timesteps) == [float(t) for t in ref.timesteps]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    for k in range(steps):
        v = torch.randn(x.shape, generator=g)
        ref._step_index = k  # pin the step like each TPP rank does
        expected = ref.step(v, ref.timesteps[k], x, return_dict=False)[0]
        got = s.step(k, x, v)
        assert torch.equal(got, expected)
        x = got


def test_step_range_checked():
    s = FlowMatchSchedule.create(4)
    with pytest.raises(ValueError):
        s.step(4, torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError):
        FlowMatchSchedule.create(0)
