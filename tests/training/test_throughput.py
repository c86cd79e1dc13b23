"""FLOPs counted on the first step, TFLOP/s and MFU in metrics.jsonl, the GPU peak table, the profiler trace."""

import json

import pytest
import torch

from mmgen.recipes import lm
from mmgen.recipes.lm import next_token_loss
from mmgen.text import GPT, GPTConfig
from mmgen.training.throughput import (
    GpuSpec,
    Throughput,
    find_gpu,
    flop_counter,
    matmul_precision,
    measure_matmul_flops,
)


def analytic_step_flops(model: GPT, batch: int, context: int) -> float:
    """nanoGPT's (PaLM appendix B) training FLOPs: 6 N per token for the weights (position embeddings excluded, the
    tied embedding counted once as the output layer) + 12 L T d per token for attention."""
    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if "position" not in name)
    per_token = 6 * weights + 12 * config.num_layers * context * config.dim
    return per_token * batch * context


def gpt_step(model, tokens):
    next_token_loss(model, tokens).backward()


def test_gpt_step_flops_equal_the_analytic_count():
    # a long context on a narrow model: attention is ~40% of the FLOPs, so a count that missed it would fail
    config = GPTConfig(vocab_size=65, context_length=128, num_layers=2, num_heads=4, dim=32)
    torch.manual_seed(0)
    model = GPT(config)
    tokens = torch.randint(0, 65, (3, 129))
    with flop_counter() as counter:
        gpt_step(model, tokens)
    expected = analytic_step_flops(model, 3, 128)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)
    assert counter.get_total_flops() > 1.3 * 6 * sum(p.numel() for p in model.parameters()) * 3 * 128


def test_counting_changes_neither_gradients_nor_the_rng_stream():
    def step(count: bool):
        torch.manual_seed(3)
        model = GPT(GPTConfig(vocab_size=17, context_length=16, num_layers=1, num_heads=2, dim=16, dropout=0.3))
        tokens = torch.randint(0, 17, (2, 17))
        throughput = Throughput.__new__(Throughput)
        throughput.flops_per_step, throughput.samples_per_step, throughput.peak, throughput.write = None, 2, None, None
        if not count:
            throughput.flops_per_step = 0  # already counted: a plain context
        with throughput.counting():
            gpt_step(model, tokens)
        return [p.grad for p in model.parameters()], torch.rand(4), throughput.flops_per_step

    counted_grads, counted_next, flops = step(True)
    plain_grads, plain_next, _ = step(False)
    assert flops > 0
    assert all(torch.equal(a, b) for a, b in zip(counted_grads, plain_grads))
    assert torch.equal(counted_next, plain_next)


def test_trainer_logs_tflops_and_mfu_and_writes_a_profile(tmp_path, tiny_lm_config, capsys):
    run = tmp_path / "run"
    lm.train(tiny_lm_config, run, ["train.max_steps=6", "train.log_every=3", "train.checkpoint_every=0",
                                   "train.eval_every=0", "train.profile=true", "train.profile_steps=2"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    model = GPT.from_pretrained(run / "final")
    flops_per_sample = analytic_step_flops(model, 1, model.config.context_length)
    for record in logged:
        assert 0 < record["throughput/mfu"] < 1.5  # of a measured matmul's rate on a CPU
        # one process: its TFLOP/s over its samples/s is the FLOPs of one sample
        measured = record["throughput/tflops"] * 1e12 / record["throughput/samples_per_s"]
        assert measured == pytest.approx(flops_per_sample, rel=0.05)
    assert "GFLOP per sample" in capsys.readouterr().out
    trace = json.loads((run / "profile" / "trace-rank0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert "aten::mm" in (run / "profile" / "summary-rank0.txt").read_text()


def test_profile_steps_must_be_positive(tmp_path, tiny_lm_config):
    from mmgen.errors import ConfigError

    with pytest.raises(ConfigError, match="profile_steps"):
        lm.train(tiny_lm_config, tmp_path / "run", ["train.profile_steps=0"])


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100 80GB PCIe", "A100 80GB"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"), ("Tesla T4", "T4"), ("h100", "H100 SXM"), ("a100-40", "A100 40GB"),
])
def test_gpu_names_find_their_datasheet_figures(name, expected):
    assert find_gpu(name).name == expected


def test_unknown_gpus_and_missing_precisions():
    assert find_gpu("NVIDIA GeForce GTX 1080") is None
    v100 = find_gpu("Tesla V100-SXM2-16GB")
    assert v100.peak_tflops("bf16") is None and v100.peak_tflops("tf32") == v100.fp32
    assert GpuSpec("x", 1, 2, 2, 1, 0.5).peak_tflops("bf16") == 2


def test_matmul_precision():
    cpu = torch.device("cpu")
    assert matmul_precision(cpu, "bf16") == "bf16"
    assert matmul_precision(cpu, "fp16") == "fp32"  # fp16 autocast has no effect on a CPU
    assert matmul_precision(cpu, "no") == "fp32"


def test_measured_matmul_rate_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    rate = measure_matmul_flops(torch.device("cpu"), size=128, seconds=0.01)
    assert rate > 1e8 and torch.equal(torch.rand(3), expected)
