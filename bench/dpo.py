"""DPO on the character-level Shakespeare GPT, measured: does the model learn a preference from pairs of its own
samples, and what does that cost its Shakespeare?

The rule, checkable by counting: prefer continuations with fewer letters 'e' (e or E). For each training prompt (a
window of the first 90% of Tiny Shakespeare) the base samples --samples continuations; the one with the fewest 'e's
is chosen, the one with the most rejected (ties: no pair). `mmgen finetune lm` with
configs/finetune-lm-shakespeare-dpo.yaml (LoRA, objective dpo) trains on the pairs. Before and after, on held-out
prompts (windows of the last 10%): the rate of 'e'-free continuations and 'e's per 100 characters; and the
next-token loss on held-out Shakespeare (fixed windows of the last 10%).

    python bench/dpo.py --base runs/shakespeare-char            # reuse a trained base
    python bench/dpo.py --base-steps 2000                       # train one first (configs/lm-shakespeare-char.yaml)
    python bench/dpo.py --base runs/shakespeare-char --quick    # a smoke run

Results: bench/results/dpo.json (dpo_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn import functional as F

import mmgen
from mmgen import cli
from mmgen.data.preferences import write_preferences
from mmgen.data.text import read_corpus
from mmgen.finetune import load_adapter
from mmgen.hub import resolve_model_folder
from mmgen.io import atomic_write_text
from mmgen.text.generate import generate
from mmgen.text.tokenizers import load_tokenizer

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
BASE_CONFIG = REPOSITORY / "configs" / "lm-shakespeare-char.yaml"
DPO_CONFIG = REPOSITORY / "configs" / "finetune-lm-shakespeare-dpo.yaml"


def e_count(text: str) -> int:
    """The rule's measure: how many letters e or E `text` holds (fewer is preferred)."""
    return text.count("e") + text.count("E")


def prompt_windows(text: str, count: int, length: int, seed: int) -> list[str]:
    """`count` seeded windows of `length` characters of `text`."""
    starts = np.random.default_rng(seed).integers(0, len(text) - length, size=count)
    return [text[start : start + length] for start in starts]


def continuations(model, tokenizer, prompts: list[str], samples: int, length: int, seed: int,
                  batch_size: int = 512) -> list[list[str]]:
    """For each prompt, `samples` sampled continuations of `length` characters (temperature 1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [prompt for prompt in prompts for _ in range(samples)]
    texts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens = torch.tensor([tokenizer.encode(prompt) for prompt in chunk], dtype=torch.long)
        output = generate(model, tokens, length, temperature=1.0, generator=generator)
        texts += [tokenizer.decode(row[tokens.shape[1]:].tolist()) for row in output]
    return [texts[index : index + samples] for index in range(0, len(texts), samples)]


def preference_pairs(prompts: list[str], samples: list[list[str]]) -> list[tuple[str, str, str]]:
    """(prompt, fewest-'e' continuation, most-'e' continuation) per prompt whose counts differ."""
    pairs = []
    for prompt, options in zip(prompts, samples):
        ranked = sorted(options, key=e_count)
        if e_count(ranked[0]) < e_count(ranked[-1]):
            pairs.append((prompt, ranked[0], ranked[-1]))
    return pairs


def rule_figures(samples: list[list[str]]) -> dict:
    """The rule's rate over all continuations: share without any 'e', and 'e's per 100 characters."""
    flat = [text for options in samples for text in options]
    return {"e_free_rate": sum(e_count(text) == 0 for text in flat) / len(flat),
            "e_per_100_chars": 100 * sum(map(e_count, flat)) / sum(map(len, flat))}


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, windows: int, seed: int, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over `windows` seeded windows (the model's context + 1) of `tokens`."""
    context = model.config.context_length
    starts = torch.from_numpy(np.random.default_rng(seed).integers(0, len(tokens) - context - 1, size=windows))
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        batch = tokens[chunk[:, None] + torch.arange(context + 1)]
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    return total / (windows * context)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="mmgen-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    base = args.base
    if base is None:
        base = work / "base"
        if cli.main(["train", "lm", "--config", str(BASE_CONFIG), "--out", str(base),
                     f"train.max_steps={args.base_steps}", "train.checkpoint_every=0", "train.progress=false"]):
            raise SystemExit("training the base failed")
        timings["base_training_s"] = round(time.perf_counter() - start, 1)
    folder = resolve_model_folder(base)
    tokenizer = load_tokenizer(folder)
    text = read_corpus(args.text)
    split = int(len(text) * 0.9)  # the base recipe's split: first 90% train, last 10% val
    val_tokens = torch.tensor(tokenizer.encode(text[split:]), dtype=torch.long)

    start = time.perf_counter()
    model = mmgen.load(folder)
    train_prompts = prompt_windows(text[:split], args.pairs, args.prompt_length, args.seed)
    eval_prompts = prompt_windows(text[split:], args.eval_prompts, args.prompt_length, args.seed + 1)
    pairs = preference_pairs(train_prompts, continuations(model, tokenizer, train_prompts, args.samples,
                                                          args.length, args.seed))
    before = rule_figures(continuations(model, tokenizer, eval_prompts, args.samples, args.length, args.seed + 2))
    before["val_loss"] = val_loss(model, val_tokens, args.val_windows, args.seed)
    write_preferences(work / "pairs.jsonl", pairs)
    timings["pairs_and_before_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    run_dir = work / "dpo"
    overrides = [f"data.preferences={work / 'pairs.jsonl'}", "train.progress=false", *args.override]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if cli.main(["finetune", "lm", "--config", str(DPO_CONFIG), "--base", str(base), "--out", str(run_dir),
                 *overrides]):
        raise SystemExit("DPO fine-tuning failed")
    timings["dpo_training_s"] = round(time.perf_counter() - start, 1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "dpo/reward_accuracy" in r]
    evaluated = [r for r in records if "val/loss" in r]

    start = time.perf_counter()
    adapted = load_adapter(mmgen.load(folder), run_dir)
    after = rule_figures(continuations(adapted, tokenizer, eval_prompts, args.samples, args.length, args.seed + 2))
    after["val_loss"] = val_loss(adapted, val_tokens, args.val_windows, args.seed)
    timings["after_s"] = round(time.perf_counter() - start, 1)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "threads": args.threads,
        "base": str(base), "rule": "prefer continuations with fewer letters 'e' (e or E)",
        "prompt_length": args.prompt_length, "continuation_length": args.length, "samples_per_prompt": args.samples,
        "train_prompts": len(train_prompts), "pairs": len(pairs), "eval_prompts": len(eval_prompts),
        "dpo": {"steps": config["train"]["max_steps"], "batch_pairs": config["train"]["batch_size"],
                "beta": config["dpo"]["beta"], "method": config["method"],
                "last_train_reward_accuracy": trained[-1]["dpo/reward_accuracy"] if trained else None,
                "last_train_reward_margin": trained[-1]["dpo/reward_margin"] if trained else None,
                "first_val_loss": evaluated[0]["val/loss"] if evaluated else None,
                "last_val_loss": evaluated[-1]["val/loss"] if evaluated else None,
                "last_val_reward_accuracy": evaluated[-1].get("val/reward_accuracy") if evaluated else None},
        "before": before, "after": after, "seconds": timings, "work": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a trained character-level GPT run or model folder")
    parser.add_argument("--base-steps", type=int, default=2000, help="without --base: train one for this many steps")
    parser.add_argument("--text", type=Path, help="the corpus (default Tiny Shakespeare)")
    parser.add_argument("--pairs", type=int, default=800, help="training prompts (a pair each unless tied)")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8, help="continuations sampled per prompt")
    parser.add_argument("--prompt-length", type=int, default=32, help="characters of each prompt")
    parser.add_argument("--length", type=int, default=24, help="characters of each continuation")
    parser.add_argument("--val-windows", type=int, default=1000, help="held-out windows for the val loss")
    parser.add_argument("--steps", type=int, help="DPO steps (default: the config's train.max_steps)")
    parser.add_argument("--override", action="append", default=[], help="a config override for the DPO run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="folder for the pairs and runs (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 prompts, 20 steps")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/dpo.json)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.eval_prompts, args.val_windows, args.steps = 64, 32, 64, args.steps or 20
    results = run(args)
    dpo = results["dpo"]
    print(f"{results['train_prompts']} training prompts -> {results['pairs']} pairs; DPO {dpo['steps']} steps, "
          f"beta {dpo['beta']}; held-out pairs: DPO loss {dpo['first_val_loss']} -> {dpo['last_val_loss']}, "
          f"reward accuracy {dpo['last_val_reward_accuracy']}")
    print(f"{'':<10}{'e-free rate':>14}{'e / 100 chars':>16}{'val loss':>12}")
    for name in ("before", "after"):
        figures = results[name]
        print(f"{name:<10}{figures['e_free_rate']:>14.3f}{figures['e_per_100_chars']:>16.2f}{figures['val_loss']:>12.4f}")
    out = args.out or RESULTS / ("dpo_quick.json" if args.quick else "dpo.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
