"""configs/accelerate/*.yaml load through `accelerate launch`'s own parsing into the plugins they name."""

import os
from pathlib import Path
from unittest import mock

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {  # file -> (distributed type, what the file must set)
    "ddp.yaml": ("MULTI_GPU", {}),
    "fsdp2-zero2.yaml": ("FSDP", {"reshard_after_forward": False}),
    "fsdp2-zero3.yaml": ("FSDP", {"reshard_after_forward": True}),
    "deepspeed-zero2.yaml": ("DEEPSPEED", {"zero_stage": 2, "offload_param_device": "none"}),
    "deepspeed-zero3.yaml": ("DEEPSPEED", {"zero_stage": 3, "offload_param_device": "none"}),
    "deepspeed-zero3-offload.yaml": ("DEEPSPEED", {"zero_stage": 3, "offload_param_device": "cpu",
                                                   "offload_optimizer_device": "cpu"}),
}


def launch_arguments(name: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_file_is_checked():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_loads_the_config(name):
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    distributed_type, settings = EXPECTED[name]
    args, defaults = launch_arguments(name)
    assert defaults.distributed_type.value == distributed_type
    assert defaults.mixed_precision == "no"  # train.mixed_precision decides
    if distributed_type == "FSDP":
        with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
            plugin = FullyShardedDataParallelPlugin()  # reads and checks the launcher's environment
        assert plugin.fsdp_version == 2
        assert plugin.transformer_cls_names_to_wrap == ["TransformerBlock", "UNetStage"]
        assert plugin.reshard_after_forward == settings["reshard_after_forward"]
    elif distributed_type == "DEEPSPEED":  # deepspeed itself is not installed here: the launcher's view of the file
        known = vars(launch_command_parser().parse_args(["train.py"]))
        assert set(defaults.deepspeed_config) <= set(known), "a key accelerate launch does not know"
        assert {key: getattr(args, key) for key in settings} == settings


def test_the_wrapped_class_names_exist():
    from mmgen.training.fsdp import sharded_block_types

    assert {"TransformerBlock", "UNetStage"} <= {cls.__name__ for cls in sharded_block_types()}


@pytest.mark.parametrize("name", ["fsdp2-zero2.yaml", "fsdp2-zero3.yaml"])
@pytest.mark.parametrize("case", ["gpt", "clip", "unet"])
def test_one_fsdp_config_wraps_every_model(name, case):
    """Accelerate refuses a wrapped class name the model lacks (a GPT has no UNetStage: seen on an H100); mmgen keeps
    the names the model has, so Accelerate's own auto-wrap policy accepts the shipped file for each family."""
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    from mmgen.training.sharded_state import keep_wrapped_classes_present
    from tests.training.fsdp_cases import _clip, _gpt, _unet

    model = {"gpt": _gpt, "clip": _clip, "unet": _unet}[case]()[0]
    args, _ = launch_arguments(name)
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    if case != "unet":
        with pytest.raises(ValueError, match="UNetStage"):  # Accelerate alone
            FullyShardedDataParallelPlugin.set_auto_wrap_policy(plugin, model)
        with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
            plugin = FullyShardedDataParallelPlugin()
    keep_wrapped_classes_present(plugin, model)
    plugin.set_auto_wrap_policy(model)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in wrapped} == ({"TransformerBlock", "UNetStage"} if case == "unet"
                                                 else {"TransformerBlock"})


def test_a_config_naming_no_class_of_the_model_is_one_clear_error():
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    from mmgen.errors import ConfigError
    from mmgen.training.sharded_state import keep_wrapped_classes_present
    from tests.training.fsdp_cases import _gpt

    args, _ = launch_arguments("fsdp2-zero3.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    with pytest.raises(ConfigError, match="LlamaDecoderLayer, none of which is in the GPT"):
        keep_wrapped_classes_present(plugin, _gpt()[0])
