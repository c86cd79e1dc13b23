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


def test_a_second_accelerator_after_fsdp_sees_the_launch_type_again():
    """Accelerate leaves FSDP in the process-wide PartialState after an FSDP Accelerator; the next Trainer's
    Accelerator would then skip its FSDP plugin (seen on an H100). The reset puts the multi-device type back."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from mmgen.training.launch import reset_accelerator_state

    PartialState()
    shared = PartialState._shared_state
    saved = dict(shared)
    try:
        for device, expected in (("cuda", DistributedType.MULTI_GPU), ("cpu", DistributedType.MULTI_CPU)):
            shared.update(distributed_type=DistributedType.FSDP, device=torch.device(device))
            reset_accelerator_state()
            assert shared["distributed_type"] == expected
        shared.update(distributed_type=DistributedType.NO)
        reset_accelerator_state()
        assert shared["distributed_type"] == DistributedType.NO  # anything else is left alone
    finally:
        shared.clear()
        shared.update(saved)
