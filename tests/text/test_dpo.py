"""DPO for the GPT (mmgen.text.dpo): the loss against trl's and a written-out formula, log 2 at the start, prompt
masking, the reference (LoRA with adapters disabled; a frozen copy for full fine-tuning) and `objective: dpo`."""

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from mmgen import cli
from mmgen.config import from_dict, load_yaml
from mmgen.data.preferences import PreferencePairs, collate_preferences, write_preferences
from mmgen.finetune import LoRAConfig, add_lora
from mmgen.finetune.reference import FrozenReference
from mmgen.recipes import lm
from mmgen.recipes.finetune_lm import LMFinetuneRecipe
from mmgen.text.dpo import DPOConfig, DPOLoss, completion_log_probs, dpo_loss
from mmgen.text.tokenizers import CharTokenizer
from tests.conftest import TINY_LM, make_corpus
from tests.finetune.helpers import FAST_TRAIN, tiny_gpt, write_yaml
from tests.test_cli import one_line_error, run_cli

ALPHABET = "abcdefghij :\n"
TRIPLES = [("ab: ", "cdef", "ghi"), ("j: ", "a", "bbbbbbb"), ("abcabc: ", "hij", "jih"), (": ", "dd", "ee ee")]


def batch_for(triples=TRIPLES, context: int = 16):
    tokenizer = CharTokenizer.train(ALPHABET)
    return tokenizer, collate_preferences(list(PreferencePairs(triples, tokenizer, context)))


def perturb_lora(model, seed: int = 5):
    """Give the (zero-initialised) LoRA B matrices random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def test_dpo_loss_is_the_written_out_formula():
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=generator) * 5 for _ in range(4))
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.3)
    margins = [0.3 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(6)]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["dpo/reward_accuracy"].item() == pytest.approx(sum(m > 0 for m in margins) / 6)
    assert metrics["dpo/reward_margin"].item() == pytest.approx(sum(margins) / 6, rel=1e-5)
    assert 0 < sum(m > 0 for m in margins) < 6  # the inputs exercise both signs


def test_completion_log_probs_mask_the_prompt_and_padding():
    tokenizer, batch = batch_for()
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        summed = completion_log_probs(model(batch["inputs"]), batch["targets"])
        # the oracle: each prompt + completion on its own (no padding), summing log p of the completion's tokens only
        order = [(p, c) for p, c, _ in TRIPLES] + [(p, r) for p, _, r in TRIPLES]
        for row, (prompt, completion) in enumerate(order):
            ids = torch.tensor([tokenizer.encode(prompt + completion)])
            log_probs = F.log_softmax(model(ids[:, :-1]), dim=-1)[0]
            start = len(tokenizer.encode(prompt))
            expected = sum(log_probs[j - 1, ids[0, j]] for j in range(start, ids.shape[1]))
            torch.testing.assert_close(summed[row], expected, atol=1e-5, rtol=1e-5)
    # changing a prompt token's target changes nothing; changing a completion token's does
    targets = batch["targets"].clone()
    assert targets[0, 0] == -100 and targets[0, 3] != -100
    with torch.no_grad():
        logits = model(batch["inputs"])
    moved = targets.clone()
    moved[0, 3] = (moved[0, 3] + 1) % tokenizer.vocab_size
    assert completion_log_probs(logits, moved)[0] != completion_log_probs(logits, targets)[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_is_log_2_where_the_policy_is_the_reference(method):
    tokenizer, batch = batch_for()
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    if method == "lora":
        add_lora(model, LoRAConfig(rank=4, targets=["attn", "mlp"]))
    loss, metrics = DPOLoss(model, DPOConfig(beta=0.5))(model.train(), batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["dpo/reward_margin"].item() == 0 and metrics["dpo/reward_accuracy"].item() == 0
    loss.backward()  # the gradient at the reference is not zero: the policy learns from the first step
    grads = [p.grad.abs().sum() for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and sum(grads) > 0


def test_lora_reference_is_the_base_with_adapters_disabled():
    tokenizer, batch = batch_for()
    base = tiny_gpt(vocab_size=tokenizer.vocab_size)
    model = add_lora(tiny_gpt(vocab_size=tokenizer.vocab_size), LoRAConfig(rank=4, targets=["attn", "mlp"]))
    perturb_lora(model)
    reference = FrozenReference(model)
    assert reference.copy is None  # no second copy of the weights
    model.train()
    with torch.no_grad():
        adapted = model(batch["inputs"])
        with reference(model) as ref:
            assert ref is model and not model.training
            torch.testing.assert_close(ref(batch["inputs"]), base(batch["inputs"]), atol=1e-5, rtol=1e-5)
        assert model.training  # mode and adapters are back
        torch.testing.assert_close(model(batch["inputs"]), adapted)
    assert (adapted - base(batch["inputs"])).abs().max() > 1e-3


def test_full_reference_is_a_frozen_copy_of_the_base():
    tokenizer, batch = batch_for()
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        before = model(batch["inputs"])
    reference = FrozenReference(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)
        with reference(model) as ref:
            assert ref is not model
            torch.testing.assert_close(ref(batch["inputs"]), before)
    assert not any(p.requires_grad for p in reference.copy.parameters())


def test_a_step_raises_the_chosen_reward_over_the_rejected():
    tokenizer, batch = batch_for()
    model = add_lora(tiny_gpt(vocab_size=tokenizer.vocab_size), LoRAConfig(rank=4, targets=["attn", "mlp"]))
    objective = DPOLoss(model, DPOConfig(beta=0.5))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss, metrics = objective(model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, metrics = objective(model, batch)
    assert loss.item() < math.log(2) - 1e-3
    assert metrics["dpo/reward_margin"].item() > 0


def trl_sigmoid_loss(model, batch: dict, reference_chosen, reference_rejected, beta: float):
    """trl's DPOTrainer loss (sigmoid, reverse KL) on the batch: its _compute_loss with precomputed reference
    log-probs, and `model` answering trl's fused-LM-head call (per-token log-probs of the labels, 0 where -100)."""
    trl = pytest.importorskip("trl")

    class FusedHead(torch.nn.Module):
        training = True

        def forward(self, input_ids, labels, **_):
            shifted = labels[:, 1:]
            logits = model(input_ids)[:, :-1]
            log_probs = torch.gather(F.log_softmax(logits, -1), -1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            log_probs = log_probs * (shifted != -100)
            zeros = torch.zeros_like(log_probs)
            return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    head = FusedHead()
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  unwrap_model=lambda x: x)
    trainer = SimpleNamespace(model=head, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                              loss_weights=[1.0], beta=beta, use_weighting=False, _total_train_tokens=0, _tp_size=1,
                              _metrics=defaultdict(lambda: defaultdict(list)))
    # trl's batch: the full sequences (chosen rows, then rejected) and a mask of the completion tokens
    kept = batch["targets"] != -100
    input_ids = torch.cat([batch["inputs"][:, :1], torch.where(kept, batch["targets"],
                                                               F.pad(batch["inputs"][:, 1:], (0, 1)))], dim=1)
    completion_mask = torch.cat([torch.zeros_like(batch["inputs"][:, :1]), kept.long()], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
              "ref_chosen_logps": reference_chosen, "ref_rejected_logps": reference_rejected}
    loss = trl.DPOTrainer._compute_loss(trainer, head, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def test_loss_and_reward_metrics_equal_trls():
    tokenizer, batch = batch_for()
    model = add_lora(tiny_gpt(vocab_size=tokenizer.vocab_size), LoRAConfig(rank=4, targets=["attn", "mlp"]))
    perturb_lora(model)
    objective = DPOLoss(model, DPOConfig(beta=0.3))
    with objective.reference(model) as reference:
        reference_chosen, reference_rejected = objective.log_probs(reference, batch)
    loss, metrics = objective(model, batch)
    expected, trl_metrics = trl_sigmoid_loss(model, batch, reference_chosen, reference_rejected, beta=0.3)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy is not the reference: a real comparison
    assert metrics["dpo/reward_accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"])
    assert metrics["dpo/reward_margin"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny trained GPT (base/), a preference JSONL and a DPO config (dpo.yaml)."""
    folder = tmp_path_factory.mktemp("dpo-lm")
    (folder / "corpus.txt").write_text(make_corpus())
    config = {name: dict(values) for name, values in TINY_LM.items()}
    config["data"]["path"] = str(folder / "corpus.txt")
    lm.train(write_yaml(folder / "lm.yaml", config), folder / "base", ["train.max_steps=2", "train.checkpoint_every=0"])
    write_preferences(folder / "pairs.jsonl", [("KING:\n", "Good night.", "The sword."), ("LORD:\n", "Fair.", "Day.")]
                      * 5)
    write_yaml(folder / "dpo.yaml", {"method": "lora", "objective": "dpo", "dpo": {"beta": 0.2},
                                     "lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"]},
                                     "data": {"preferences": str(folder / "pairs.jsonl"), "val_fraction": 0.2},
                                     "train": FAST_TRAIN})
    return folder


def test_objective_dpo_runs_and_logs_reward_accuracy_and_margin(folder, capsys):
    code, out, _ = run_cli(["finetune", "lm", "--config", folder / "dpo.yaml", "--base", folder / "base",
                            "--out", folder / "run", "train.checkpoint_every=0"], capsys)
    assert code == 0 and "8 preference pairs for training, 2 held out" in out
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert logged and all({"dpo/reward_accuracy", "dpo/reward_margin"} <= set(r) for r in logged)
    assert abs(logged[0]["train/loss"] - math.log(2)) < 0.05  # first window: the policy is near the reference
    evaluated = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(0 <= r["val/reward_accuracy"] <= 1 and "val/reward_margin" in r for r in evaluated)
    assert sorted(p.name for p in (folder / "run" / "final").iterdir()) == ["adapter.safetensors",
                                                                             "adapter_config.json"]


@pytest.mark.parametrize("override,code,fragment", [
    ("objective=sft", 2, "objective dpo trains on data.preferences"),
    ("data.path=corpus.txt", 2, "give one of path (a text), instructions or preferences"),
    ("dpo.beta=0", 2, "beta must be positive"),
    ("data.preferences=missing.jsonl", 1, "preference file not found: missing.jsonl"),
])
def test_bad_dpo_configs_are_one_line_errors(folder, capsys, override, code, fragment):
    got, _, err = run_cli(["finetune", "lm", "--config", folder / "dpo.yaml", "--base", folder / "base",
                           "--out", folder / f"bad-{abs(hash(override))}", override], capsys)
    one_line_error(got, err, code, fragment)


def test_a_bad_preference_line_names_the_file_and_line(folder, capsys):
    (folder / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1}\n')
    got, _, err = run_cli(["finetune", "lm", "--config", folder / "dpo.yaml", "--base", folder / "base",
                           "--out", folder / "bad-line", f"data.preferences={folder / 'bad.jsonl'}"], capsys)
    one_line_error(got, err, 1, "bad.jsonl line 2: expected an object with string")


def test_the_shipped_config_validates():
    config = Path(__file__).resolve().parents[2] / "configs" / "finetune-lm-shakespeare-dpo.yaml"
    recipe = from_dict(LMFinetuneRecipe, load_yaml(config))
    assert (recipe.objective, recipe.method, recipe.base) == ("dpo", "lora", "runs/shakespeare-char")
    assert recipe.data.preferences and recipe.dpo.beta == 1.0


def test_a_resumed_full_run_keeps_the_base_as_its_reference(folder):
    """The frozen copy is taken before the Trainer loads the checkpoint: a resumed run ends where an unbroken one does."""
    options = ["--config", folder / "dpo.yaml", "--base", folder / "base", "method=full", "train.checkpoint_every=2"]
    assert cli.main([str(a) for a in ["finetune", "lm", *options, "--out", folder / "full"]]) == 0
    shutil.copytree(folder / "full", folder / "full-resumed")
    shutil.rmtree(folder / "full-resumed/final")
    shutil.rmtree(folder / "full-resumed/checkpoints/step-4", ignore_errors=True)
    assert cli.main(["finetune", "lm", "--resume", str(folder / "full-resumed")]) == 0
    whole = load_file(str(folder / "full/final/model.safetensors"))
    resumed = load_file(str(folder / "full-resumed/final/model.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    base = load_file(str(folder / "base/final/model.safetensors"))
    assert not torch.equal(base["norm.weight"], whole["norm.weight"])  # full fine-tuning moved the weights
