"""benchmarks/profile_step.py: the profiler summary of a Distiller step (run on CPU here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dmdcopy.distill import DistillConfig, Distiller
from dmdcopy.nets import MLP, SongUNet
from dmdcopy.precond import EDMPrecond
from dmdcopy.students import OneStepStudent

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def _distiller(net):
    torch.manual_seed(0)
    teacher = EDMPrecond(net())
    student = OneStepStudent(EDMPrecond(net()))
    cfg = DistillConfig(batch_size=4, num_steps=100, generator_lr=1e-3, fake_score_lr=1e-3,
                        fake_score_steps=2, ema_halflife_steps=5.0, progress_bar=False)
    return Distiller(teacher, student, config=cfg)


@pytest.mark.parametrize("name, expected", [
    ("aten::convolution_backward", "convolution"), ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "attention/matmul"), ("aten::_scaled_dot_product_flash_attention", "attention/matmul"),
    ("aten::_softmax", "attention/matmul"), ("aten::native_group_norm_backward", "normalisation"),
    ("aten::copy_", "data movement"), ("aten::cat", "data movement"), ("nccl:all_gather", "communication"),
    ("c10d::allreduce_", "communication"), ("aten::broadcast_tensors", "other"), ("aten::mul", "other"),
    ("aten::addcmul", "other"),
])
def test_operator_names_go_to_their_category(name, expected):
    assert profile_step.categorise(name) == expected


def test_unet_step_summary_adds_up_and_finds_every_part():
    d = _distiller(lambda: SongUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[4], dropout=0.0))
    out = profile_step.profile_distiller(d, steps=1, warmup=1)
    s = out["seconds"]
    assert set(s) == set(profile_step.CATEGORIES) and all(v >= 0 for v in s.values())
    for cat in ("convolution", "attention/matmul", "normalisation", "optimiser", "EMA", "data movement"):
        assert s[cat] > 0, cat
    assert s["communication"] == 0  # one process
    assert 0 < sum(s.values()) <= out["wall_s"] * 1.05  # CPU operator time within the wall time
    assert out["scalar_reads"] >= 3  # the finiteness checks read each update's loss and norm
    assert "| total (CPU operator time) |" in out["table"] and out["table"].count("\n") == len(s) + 3
    # the scopes are gone afterwards
    assert "step" not in vars(d.generator_optimizer) and "_clip_and_check" not in vars(d)
    assert profile_step.count_sync_warnings(lambda: None, torch.device("cpu")) is None


def test_summary_is_the_sum_of_self_times():
    class E:  # a profiler event: name, self times, parent, kernels
        def __init__(self, name, us, parent=None):
            self.name, self.self_cpu_time_total, self.self_device_time_total = name, us, 0
            self.cpu_parent, self.kernels = parent, []

    scope = E("dmdcopy::optimiser", 5)
    events = [E("aten::addmm", 100), E("aten::conv2d", 40), scope, E("aten::mul", 7, scope),
              E("aten::mul", 3), E("aten::empty", 0)]
    s = profile_step.summarise(events, device_time=False)
    assert s["attention/matmul"] == pytest.approx(1e-4) and s["convolution"] == pytest.approx(4e-5)
    assert s["optimiser"] == pytest.approx(1.2e-5) and s["other"] == pytest.approx(3e-6)
    assert sum(s.values()) == pytest.approx(155e-6)
    d = _distiller(lambda: MLP(2, hidden=8, depth=1))
    assert profile_step.profile_distiller(d, steps=1)["seconds"]["attention/matmul"] > 0
