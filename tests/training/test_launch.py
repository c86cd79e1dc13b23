"""mmgen.training.launch: which Accelerator arguments each kind of launch gets on a machine without CUDA."""

import pytest

from mmgen.training import launch

LAUNCH = {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_keeps_accelerates_default(without_cuda):
    assert launch.accelerator_options() == {"cpu": False}
    assert launch.process_state_options() == {"cpu": False}


def test_a_plain_multi_process_launch_runs_ddp_on_cpu(without_cuda):
    for name, value in LAUNCH.items():
        without_cuda.setenv(name, value)
    assert launch.accelerator_options() == {"cpu": True}  # MULTI_CPU over gloo
    assert launch.process_state_options() == {"cpu": True}


def test_a_deepspeed_launch_runs_deepspeed_over_gloo_instead_of_dropping_it(without_cuda):
    for name, value in {**LAUNCH, "ACCELERATE_USE_DEEPSPEED": "true"}.items():
        without_cuda.setenv(name, value)
    options = launch.accelerator_options()
    assert options["cpu"] is False  # cpu=True would make Accelerate ignore DeepSpeed
    assert [handler.backend for handler in options["kwargs_handlers"]] == ["gloo"]
    assert launch.process_state_options() == {"cpu": False, "backend": "gloo"}


def test_with_cuda_nothing_changes(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    for name, value in {**LAUNCH, "ACCELERATE_USE_DEEPSPEED": "true"}.items():
        monkeypatch.setenv(name, value)
    assert launch.accelerator_options() == {"cpu": False}
