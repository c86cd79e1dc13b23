"""Character-level Shakespeare: `mmgen train lm` against a plain-PyTorch reference loop, same run, same machine.

The reference is nanoGPT's training loop (random windows, AdamW, warm-up + cosine) around transformers'
GPT2LMHeadModel of the recipe's shape. Both are timed as whole commands, start-up included, and both final
models are scored on the whole validation split as well as on the recipe's 20 evaluation batches.

    python bench/lm_shakespeare.py                        # the recipe as configured (2000 steps)
    python bench/lm_shakespeare.py --steps 200            # a quick look
    python bench/lm_shakespeare.py --skip-reference model.positions=learned
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIG = REPOSITORY / "configs" / "lm-shakespeare-char.yaml"


def full_validation_loss(model, tokens: torch.Tensor, context: int, logits_of=lambda out: out) -> float:
    """Mean next-token loss over every non-overlapping window of the validation split."""
    starts = torch.arange(0, len(tokens) - context - 1, context)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for first in range(0, len(starts), 512):
            windows = tokens[starts[first : first + 512, None] + torch.arange(context + 1)]
            logits = logits_of(model(windows[:, :-1]))
            total += F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
            count += windows[:, 1:].numel()
    return total / count


def run_mmgen(out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(CONFIG), "--out", str(out),
               "train.progress=false", *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in records if "val/loss" in r]
    throughput = [r["throughput/tokens_per_s"] for r in records if "throughput/tokens_per_s" in r]
    return {"wall_s": wall, "val_loss_20_batches": val[-1], "tokens_per_s_median": sorted(throughput)[len(throughput) // 2]}


REFERENCE_LOOP = r'''
import json, math, sys, time
import torch
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel
out, steps, text_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(1337)
text = open(text_path).read()
chars = sorted(set(text)); index = {c: i for i, c in enumerate(chars)}
data = torch.tensor([index[c] for c in text]); split = int(0.9 * len(data))
train, val = data[:split], data[split:]
block, batch = 64, 12
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(chars), n_positions=block, n_embd=128, n_layer=4, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
decay = [p for p in model.parameters() if p.dim() >= 2]; no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.99))
def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100):
    if it < warmup: return lr * (it + 1) / (warmup + 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (steps - warmup))) * (lr - min_lr)
def get_batch(source):
    ix = torch.randint(len(source) - block, (batch,))
    return torch.stack([source[i:i + block] for i in ix]), torch.stack([source[i + 1:i + 1 + block] for i in ix])
@torch.no_grad()
def val_loss():
    model.eval(); losses = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
                            for x, y in (get_batch(val) for _ in range(20))]; model.train(); return sum(losses) / 20
for it in range(steps):
    for group in optimizer.param_groups: group["lr"] = lr_at(it)
    x, y = get_batch(train)
    loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    if (it + 1) % 250 == 0 or it + 1 == steps: last_val = val_loss()
model.save_pretrained(out)
json.dump({"val_loss_20_batches": last_val, "chars": "".join(chars)}, open(out + "/result.json", "w"))
'''


def run_reference(out: Path, steps: int, text_path: Path) -> dict:
    script = out.parent / "reference_loop.py"
    script.write_text(REFERENCE_LOOP)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(out), str(steps), str(text_path)], check=True)
    wall = time.perf_counter() - start
    return {"wall_s": wall, **json.loads((out / "result.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps (both sides)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra mmgen config overrides")
    args = parser.parse_args()

    import yaml

    import mmgen
    from mmgen.data.text import tiny_shakespeare_path
    from mmgen.text import load_tokenizer

    recipe = yaml.safe_load(CONFIG.read_text())
    steps = args.steps or recipe["train"]["max_steps"]
    context = recipe["model"]["context_length"]
    text_path = tiny_shakespeare_path()
    text = text_path.read_text()
    results = {"date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads(), "steps": steps,
               "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        overrides = [f"train.max_steps={steps}", *args.overrides]
        results["mmgen"] = run_mmgen(scratch / "mmgen", overrides)
        model, tokenizer = mmgen.load(scratch / "mmgen"), load_tokenizer(scratch / "mmgen" / "final")
        tokens = torch.tensor(tokenizer.encode(text))
        results["mmgen"]["val_loss_full_split"] = full_validation_loss(model, tokens[int(0.9 * len(tokens)):], context)
        if not args.skip_reference:
            from transformers import GPT2LMHeadModel

            results["reference"] = run_reference(scratch / "reference", steps, text_path)
            reference = GPT2LMHeadModel.from_pretrained(scratch / "reference")
            index = {c: i for i, c in enumerate(results["reference"].pop("chars"))}
            ref_tokens = torch.tensor([index[c] for c in text])
            results["reference"]["val_loss_full_split"] = full_validation_loss(
                reference, ref_tokens[int(0.9 * len(ref_tokens)):], context, logits_of=lambda out: out.logits)
            results["speedup_vs_reference"] = results["reference"]["wall_s"] / results["mmgen"]["wall_s"]
    print(json.dumps(results, indent=2))
    target = REPOSITORY / "bench" / "results"
    target.mkdir(exist_ok=True)
    (target / "lm_shakespeare.json").write_text(json.dumps(results, indent=2))
    if math.isfinite(results["mmgen"]["val_loss_20_batches"]):
        print(f"mmgen: {results['mmgen']['wall_s']:.1f} s, val {results['mmgen']['val_loss_20_batches']:.4f} "
              f"(full split {results['mmgen']['val_loss_full_split']:.4f})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
