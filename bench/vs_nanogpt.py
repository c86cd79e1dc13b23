"""`mmgen train lm` against nanoGPT's own train.py: the CPU recipe, whole commands timed side by side.

nanoGPT's documented CPU run of config/train_shakespeare_char.py (4 layers, 4 heads, width 128, context 64, batch 12,
2000 iterations, no dropout, no torch.compile, 20 evaluation batches) and `mmgen train lm --config
configs/lm-shakespeare-char.yaml` (the same shape and evaluation; the recipe's own number of steps, fewer than
nanoGPT's 2000, unless --mmgen-steps says otherwise) run one after the other, then in the other order, with the same
number of threads. The question asked is the time each takes to its val loss: the goal is mmgen <= 0.85x the wall
time at val <= 1.88 (nanoGPT's published figure). Each whole command is timed, start-up included; the report gives each
wall time, the ratio mmgen / nanoGPT, the last val loss each printed (20 random batches of the last 10% of the text)
and the loss of each final model on the whole held-out 10% (every non-overlapping window of 64 characters).

bench/ fetches nothing: point it at a nanoGPT checkout whose data/shakespeare_char is prepared from the same Tiny
Shakespeare that mmgen reads (copy it to data/shakespeare_char/input.txt there and run that folder's prepare.py):

    python bench/vs_nanogpt.py --nanogpt /path/to/nanoGPT                    # 2000 steps, 1 thread, both orders
    python bench/vs_nanogpt.py --nanogpt /path/to/nanoGPT --steps 250 --mmgen-steps 250 --order mmgen-first  # a look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmgen.errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIG = REPOSITORY / "configs" / "lm-shakespeare-char.yaml"
EVAL_INTERVAL = 250  # nanoGPT's config/train_shakespeare_char.py and configs/lm-shakespeare-char.yaml alike
# nanoGPT's README, "I only have a macbook" / CPU: its flags for the small character-level run
NANOGPT_FLAGS = ("--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                 "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0")
NANOGPT_VAL = re.compile(r"^step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", re.MULTILINE)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: --nanogpt PATH [--steps N] [--threads N] [--order ...] [--json FILE]."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout with shakespeare_char prepared")
    parser.add_argument("--steps", type=positive_int, default=2000, help="nanoGPT's iterations (default 2000)")
    parser.add_argument("--mmgen-steps", type=positive_int, default=None,
                        help="mmgen's steps (default: the recipe's train.max_steps)")
    parser.add_argument("--threads", type=positive_int, default=1, help="OMP/MKL threads of both (default 1)")
    parser.add_argument("--order", choices=("both", "nanogpt-first", "mmgen-first"), default="both",
                        help="both: nanoGPT, mmgen, then mmgen, nanoGPT (default)")
    parser.add_argument("--json", type=Path, default=REPOSITORY / "bench" / "results" / "vs_nanogpt.json",
                        help="where the results go (default bench/results/vs_nanogpt.json)")
    return parser.parse_args(argv)


def check_checkout(nanogpt: Path, text: str) -> None:
    """Raise UserError unless `nanogpt` has train.py, the config and shakespeare_char prepared from `text`."""
    for name in ("train.py", "model.py", "config/train_shakespeare_char.py"):
        if not (nanogpt / name).is_file():
            raise UserError(f"--nanogpt {nanogpt}: no {name}; point it at a nanoGPT checkout")
    data = nanogpt / "data" / "shakespeare_char"
    prepare = f"copy Tiny Shakespeare to {data / 'input.txt'} and run prepare.py in {data}"
    for name in ("input.txt", "train.bin", "val.bin"):
        if not (data / name).is_file():
            raise UserError(f"--nanogpt: {data / name} is missing; {prepare}")
    if (data / "input.txt").read_text(encoding="utf-8") != text:
        raise UserError(f"--nanogpt: {data / 'input.txt'} is not the Tiny Shakespeare mmgen trains on; {prepare}")


def nanogpt_command(steps: int, out_dir: Path) -> list[str]:
    """nanoGPT's train.py command line (run in its checkout) for the CPU recipe over `steps` iterations.

    nanoGPT evaluates where the iteration is a multiple of eval_interval: for a step count that is not a multiple
    of 250 the interval becomes the step count, so that the last iteration is evaluated (as mmgen's is)."""
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS,
               f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--out_dir={out_dir}"]
    if steps % EVAL_INTERVAL:
        command.append(f"--eval_interval={steps}")
    return command


def mmgen_command(steps: int | None, out_dir: Path) -> list[str]:
    """`mmgen train lm` with configs/lm-shakespeare-char.yaml (no progress bar), for `steps` steps or, with None,
    the recipe's own train.max_steps."""
    return [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(CONFIG), "--out", str(out_dir),
            *([f"train.max_steps={steps}"] if steps is not None else []), "train.progress=false"]


def recipe_steps() -> int:
    """configs/lm-shakespeare-char.yaml's train.max_steps."""
    import yaml

    return yaml.safe_load(CONFIG.read_text())["train"]["max_steps"]


def last_nanogpt_val(output: str) -> tuple[int, float]:
    """(iteration, val loss) of the last 'step N: train loss X, val loss Y' line nanoGPT printed."""
    found = NANOGPT_VAL.findall(output)
    if not found:
        raise UserError("nanoGPT printed no 'step N: ... val loss' line")
    step, loss = found[-1]
    return int(step), float(loss)


def last_mmgen_val(run_dir: Path) -> tuple[int, float]:
    """(step, val/loss) of the last evaluation in an mmgen run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if "val/loss" in r]
    if not evaluations:
        raise UserError(f"{run_dir / 'metrics.jsonl'} has no val/loss")
    return evaluations[-1]["step"], evaluations[-1]["val/loss"]


def timed(command: list[str], cwd: Path, threads: int) -> tuple[float, str]:
    """(wall seconds, stdout) of `command`; a failure is a UserError with the tail of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise UserError(f"{' '.join(command[:3])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall, done.stdout


def full_split_loss(loss_of, tokens, context: int) -> float:
    """Mean next-token loss over every non-overlapping window of `context` + 1 tokens; loss_of(x, y) -> mean loss."""
    import torch

    starts = torch.arange(0, len(tokens) - context - 1, context)
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(starts), 512):
            windows = tokens[starts[first : first + 512, None] + torch.arange(context + 1)]
            x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
            total += loss_of(x, y).item() * y.numel()
            count += y.numel()
    return total / count


def score_mmgen(run_dir: Path, text: str, context: int) -> float:
    """The whole-held-out-split loss of an mmgen run's final model (its own tokenizer)."""
    import torch
    from torch.nn import functional as F

    import mmgen
    from mmgen.text import load_tokenizer

    model, tokenizer = mmgen.load(run_dir).eval(), load_tokenizer(run_dir / "final")
    tokens = torch.tensor(tokenizer.encode(text[int(0.9 * len(text)):]))
    return full_split_loss(lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten()), tokens, context)


def score_nanogpt(nanogpt: Path, out_dir: Path, text: str, context: int) -> tuple[int, float]:
    """(iteration, whole-held-out-split loss) of nanoGPT's saved checkpoint (the best evaluated, as its config saves
    one only when val improves), with nanoGPT's model.py and its prepare.py's vocabulary (sorted characters)."""
    import torch

    sys.path.insert(0, str(nanogpt))
    try:
        import model as nanogpt_model
    finally:
        sys.path.remove(str(nanogpt))
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = nanogpt_model.GPT(nanogpt_model.GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    model.eval()
    index = {char: i for i, char in enumerate(sorted(set(text)))}
    split = int(0.9 * len(text))  # nanoGPT's prepare.py: the last 10% of the characters is val
    tokens = torch.tensor([index[char] for char in text[split:]])
    return checkpoint["iter_num"], full_split_loss(lambda x, y: model(x, y)[1], tokens, context)


def run_nanogpt(args, scratch: Path, text: str) -> dict:
    """Time nanoGPT's train.py once and score it."""
    out = Path(tempfile.mkdtemp(prefix="nanogpt-", dir=scratch))
    wall, stdout = timed(nanogpt_command(args.steps, out), args.nanogpt, args.threads)
    step, val = last_nanogpt_val(stdout)
    result = {"wall_s": round(wall, 2), "val_loss_printed": val, "val_loss_step": step}
    if (out / "ckpt.pt").is_file():
        result["checkpoint_step"], result["val_loss_full_split"] = score_nanogpt(args.nanogpt, out, text, 64)
    return result


def run_mmgen(args, scratch: Path, text: str) -> dict:
    """Time `mmgen train lm` once and score it."""
    out = Path(tempfile.mkdtemp(prefix="mmgen-", dir=scratch)) / "run"
    wall, _ = timed(mmgen_command(args.mmgen_steps, out), REPOSITORY, args.threads)
    step, val = last_mmgen_val(out)
    return {"wall_s": round(wall, 2), "val_loss_printed": val, "val_loss_step": step,
            "val_loss_full_split": score_mmgen(out, text, 64)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmgen.data.text import tiny_shakespeare_path

    text = tiny_shakespeare_path(download=False).read_text(encoding="utf-8")
    check_checkout(args.nanogpt.resolve(), text)
    args.nanogpt = args.nanogpt.resolve()
    orders = {"both": [("nanogpt", "mmgen"), ("mmgen", "nanogpt")], "nanogpt-first": [("nanogpt", "mmgen")],
              "mmgen-first": [("mmgen", "nanogpt")]}[args.order]
    runners = {"nanogpt": run_nanogpt, "mmgen": run_mmgen}
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for order in orders:
            done = {}
            for name in order:
                done[name] = runners[name](args, Path(scratch), text)
                print(f"{name}: {json.dumps(done[name])}", flush=True)
            done["order"] = " then ".join(order)
            done["ratio_mmgen_over_nanogpt"] = round(done["mmgen"]["wall_s"] / done["nanogpt"]["wall_s"], 3)
            rounds.append(done)
    import torch

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
               "mmgen_steps": args.mmgen_steps or recipe_steps(),
               "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "nanogpt_command": " ".join(nanogpt_command(args.steps, Path("OUT"))[1:]),
               "mmgen_command": " ".join(["mmgen", *mmgen_command(args.mmgen_steps, Path("OUT"))[3:]]),
               "rounds": rounds,
               "ratio_mean": round(math.fsum(r["ratio_mmgen_over_nanogpt"] for r in rounds) / len(rounds), 3)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for r in rounds:
        print(f"{r['order']}: nanoGPT {r['nanogpt']['wall_s']:.1f} s (val {r['nanogpt']['val_loss_printed']:.4f}), "
              f"mmgen {r['mmgen']['wall_s']:.1f} s (val {r['mmgen']['val_loss_printed']:.4f}): "
              f"{r['ratio_mmgen_over_nanogpt']:.3f}x")
    print(f"mean ratio mmgen / nanoGPT: {results['ratio_mean']:.3f}x; written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
