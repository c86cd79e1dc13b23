"""train.compile: the Trainer's model through torch.compile (Accelerate's dynamo plugin), same training as eager."""

import json

import pytest

from mmgen.training import TrainConfig
from mmgen.training.fsdp import FSDPConfig
from tests.training.fsdp_cases import max_difference, train, weights


def test_compiled_training_equals_eager(tmp_path):
    eager = train("gpt", tmp_path / "eager")
    compiled = train("gpt", tmp_path / "compiled", compile=True)
    assert type(compiled.prepared_model).__name__ == "OptimizedModule"  # it really ran compiled
    assert type(compiled._model_to_keep()).__name__ == "GPT"  # what is saved and evaluated is the plain module
    a, b = weights(tmp_path / "eager" / "final"), weights(tmp_path / "compiled" / "final")
    assert sorted(a) == sorted(b)  # no _orig_mod. prefixes
    assert max_difference(a, b) < 1e-4
    assert max_difference(b, weights(tmp_path / "compiled" / "checkpoints" / "step-2")) > 1e-4  # it trained
    records = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert all(record.get("throughput/tflops", 1) > 0 for record in records)  # FLOPs counted through the compile
    assert eager.flops_per_step == compiled.flops_per_step


def test_compile_with_mmgen_fsdp_is_refused():
    with pytest.raises(ValueError, match="compile is not supported with fsdp.enabled"):
        TrainConfig(compile=True, fsdp=FSDPConfig(enabled=True))


def test_a_failing_compiler_is_one_line(tmp_path, monkeypatch):
    """No C++ compiler, an Inductor bug: one ConfigError line naming train.compile, not a traceback wall."""
    import torch._dynamo
    import torch._inductor.compile_fx

    from mmgen.errors import ConfigError

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found\nmore lines")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match=r"^train.compile=true: torch.compile failed \(no working C\+\+ "
                                          r"compiler found\); train without it"):
        train("gpt", tmp_path / "run", compile=True)
    assert not (tmp_path / "run" / "final").exists()
    torch._dynamo.reset()  # forget the failed frames for later tests


def test_compiled_training_keeps_an_ema(tmp_path):
    """The EMA follows the compiled model's weights (it failed on their _orig_mod. names) and equals eager's EMA."""
    train("gpt", tmp_path / "eager", ema_decay=0.9)
    compiled = train("gpt", tmp_path / "compiled", compile=True, ema_decay=0.9)
    assert type(compiled.prepared_model).__name__ == "OptimizedModule"
    a, b = weights(tmp_path / "eager" / "final"), weights(tmp_path / "compiled" / "final")
    assert max_difference(a, b) < 1e-4
    step = tmp_path / "compiled" / "checkpoints" / "step-2"
    average, raw = weights(step, "ema.safetensors"), weights(step)
    assert max_difference(average, {name: raw[name] for name in average}) > 1e-5  # it averaged
