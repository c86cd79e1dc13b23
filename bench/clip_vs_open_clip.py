"""mmgen's CLIP recipe against open_clip's own trainer (`open_clip_train`) on the same real image-caption table.

Both train the same architecture (configs/clip-shapes.yaml's model, written as an open_clip model config JSON) with
the same batch, optimizer steps, AdamW (lr, weight decay, betas, eps, gradient clipping), linear warm-up and cosine
decay to 0, fp32, on the same CSV, one after the other with the same thread count. open_clip counts epochs of
floor(pairs / batch) steps, so the step budget is epochs x that. Both are then judged by ONE harness: open_clip's
checkpoint is converted to an mmgen CLIP (mmgen.clip.open_clip_interop.from_open_clip, exact to 1e-4), and both go
through mmgen.recipes.clip.HeldOutEvaluation on the held-out split: zero-shot top-1/top-5 over the class folders with
the data's zero-shot templates, and image<->text recall@k on the held-out captions.

    python bench/real_data.py digits --out data/digits
    python bench/clip_vs_open_clip.py --data data/digits --epochs 30 --threads 1

Wall time is each trainer's whole process (start-up, data loading, training; mmgen's also its one final
evaluation), as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmgen.clip.model import CLIP, CLIPConfig
from mmgen.config import from_dict, load_yaml
from mmgen.errors import UserError
from mmgen.io import atomic_write_text

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
MODEL_NAME = "mmgen-clip-bench"  # the name the open_clip model config is registered under
# lets `python -m open_clip_train.main` see a model config JSON that is not one of open_clip's own
OPEN_CLIP_LAUNCHER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                      "from open_clip_train.main import main; main(sys.argv[2:])")


def recipe_model(config_path: Path) -> CLIPConfig:
    """The `model:` section of a CLIP recipe YAML as a CLIPConfig."""
    return from_dict(CLIPConfig, load_yaml(config_path).get("model", {}), "model")


def open_clip_model_config(config: CLIPConfig) -> dict:
    """open_clip's model config JSON for the same architecture as mmgen's `config` (see open_clip_interop)."""
    if config.mlp not in ("gelu", "quick_gelu"):
        raise UserError(f"this bench compares GELU / QuickGELU CLIPs; model.mlp is {config.mlp!r}")
    vision, text = config.vision, config.text
    model = {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
                       "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio,
                       "patch_size": vision.patch_size},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio},
    }
    if config.mlp == "quick_gelu":
        model["quick_gelu"] = True
    return model


def count_rows(table: Path) -> int:
    """Data rows of a CSV with a header line."""
    with open(table, newline="") as file:
        return max(0, sum(1 for line in file if line.strip()) - 1)


def absolute_table(table: Path, out: Path) -> Path:
    """A copy of `table` whose image column holds absolute paths (open_clip opens them relative to its working
    folder; mmgen relative to the table's)."""
    import csv

    with open(table, newline="") as file:
        reader = csv.DictReader(file)
        rows = [{**row, "image": str((table.parent / row["image"]).resolve())} for row in reader]
        fields = reader.fieldnames
    with open(out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out


def run_timed(command: list[str], log: Path, threads: int) -> float:
    """Run `command` with `threads` intra-op threads, its output in `log`; its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPOSITORY)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{command[0:4]} failed (exit {result.returncode}); {log}:\n" + "\n".join(tail))
    return seconds


def train_mmgen(args, work: Path, steps: int, warmup: int) -> tuple[Path, float]:
    """`mmgen train clip` with the recipe retargeted at the data; (model folder, wall seconds)."""
    data = args.data.resolve()
    templates = "[" + ",".join(json.dumps(t) for t in zeroshot_templates(data)) + "]"
    overrides = [
        f"data.train={data / 'train.csv'}", f"data.val={data / 'val.csv'}", f"data.zeroshot={data / 'val'}",
        f"data.zeroshot_templates={templates}", f"data.retrieval={data / 'val.csv'}", "data.eval_samples=10000",
        f"train.batch_size={args.batch_size}", f"train.max_steps={steps}", f"train.warmup_steps={warmup}",
        f"train.lr={args.lr}", "train.min_lr=0", f"train.weight_decay={args.weight_decay}",
        f"train.betas=[{args.betas[0]},{args.betas[1]}]", f"train.grad_clip={args.grad_clip}",
        "train.eval_every=0", "train.checkpoint_every=0", "train.num_workers=0", f"train.seed={args.seed}",
        "train.tensorboard=false", "train.progress=false", "train.log_every=50",
    ]
    run_dir = work / "mmgen"
    command = [sys.executable, "-m", "mmgen.cli", "train", "clip", "--config", str(args.config), "--out",
               str(run_dir), *overrides]
    seconds = run_timed(command, work / "mmgen.log", args.threads)
    return run_dir / "final", seconds


def train_open_clip(args, work: Path, epochs: int, warmup: int) -> tuple[Path, float]:
    """`open_clip_train` on the same table and architecture; (checkpoint file, wall seconds)."""
    config_dir = work / "open_clip_models"
    config_dir.mkdir(exist_ok=True)
    model_config = open_clip_model_config(recipe_model(args.config))
    (config_dir / f"{MODEL_NAME}.json").write_text(json.dumps(model_config, indent=2) + "\n")
    table = absolute_table(args.data / "train.csv", work / "train-absolute.csv")
    command = [
        sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(config_dir),
        "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "image",
        "--csv-caption-key", "caption", "--model", MODEL_NAME, "--device", "cpu", "--precision", "fp32",
        "--batch-size", str(args.batch_size), "--epochs", str(epochs), "--warmup", str(warmup),
        "--lr", str(args.lr), "--wd", str(args.weight_decay), "--beta1", str(args.betas[0]),
        "--beta2", str(args.betas[1]), "--eps", "1e-8", "--grad-clip-norm", str(args.grad_clip),
        "--lr-scheduler", "cosine", "--workers", "0", "--seed", str(args.seed), "--save-frequency", str(epochs),
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--log-every-n-steps", "50",
        "--logs", str(work / "open_clip_logs"), "--name", "run",
    ]
    seconds = run_timed(command, work / "open_clip.log", args.threads)
    return work / "open_clip_logs" / "run" / "checkpoints" / f"epoch_{epochs}.pt", seconds


def load_open_clip_as_mmgen(checkpoint: Path, config: CLIPConfig) -> CLIP:
    """open_clip_train's checkpoint (a torch.save dict: read tensors only) as an mmgen CLIP."""
    import open_clip

    from mmgen.clip.open_clip_interop import from_open_clip, to_open_clip

    model = to_open_clip(CLIP(config))  # the same architecture, open_clip's class
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({name.removeprefix("module."): tensor for name, tensor in state.items()})
    assert isinstance(model, open_clip.CLIP)
    return from_open_clip(model.eval())


def zeroshot_templates(data: Path) -> list[str]:
    """DATA/zeroshot_templates.txt's lines (bench/real_data.py writes it)."""
    return [line for line in (data / "zeroshot_templates.txt").read_text().splitlines() if line.strip()]


def evaluate(model: CLIP, data: Path) -> dict:
    """The one harness: zero-shot over DATA/val's class folders, retrieval on DATA/val.csv (every held-out image)."""
    from mmgen.recipes.clip import CLIPDataConfig, CLIPRecipe, HeldOutEvaluation

    section = CLIPDataConfig(train=str(data / "train.csv"), val=None, zeroshot=str(data / "val"),
                             zeroshot_templates=zeroshot_templates(data), retrieval=str(data / "val.csv"),
                             eval_samples=100_000)
    metrics = HeldOutEvaluation(CLIPRecipe(model=model.config, data=section))(model.eval())
    return {name: round(float(value), 4) for name, value in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by bench/real_data.py")
    parser.add_argument("--config", type=Path, default=REPOSITORY / "configs" / "clip-shapes.yaml",
                        help="the mmgen CLIP recipe (its model section is given to open_clip too)")
    parser.add_argument("--epochs", type=int, default=30, help="open_clip epochs; mmgen gets the same step count")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps (capped at a tenth of the steps)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both trainers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--open-clip-first", action="store_true",
                        help="train open_clip first (on a shared machine, run both orders: load drifts)")
    parser.add_argument("--work", type=Path, default=RESULTS / "clip_vs_open_clip", help="run folders (replaced)")
    parser.add_argument("--out", type=Path, default=RESULTS / "clip_vs_open_clip.json")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 2 or args.threads < 1:
        parser.error("--epochs >= 1, --batch-size >= 2 and --threads >= 1 are needed")
    try:
        for name in ("train.csv", "val.csv", "val", "zeroshot_templates.txt"):
            if not (args.data / name).exists():
                raise UserError(f"{args.data / name} not found; write the data with bench/real_data.py")
        pairs = count_rows(args.data / "train.csv")
        steps_per_epoch = pairs // args.batch_size
        if steps_per_epoch < 1:
            raise UserError(f"{pairs} training pairs make no full batch of {args.batch_size}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    steps = steps_per_epoch * args.epochs
    warmup = min(args.warmup, steps // 10)
    if args.work.exists():
        import shutil

        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    torch.set_num_threads(args.threads)
    print(f"{pairs} pairs, batch {args.batch_size}: {steps} steps ({args.epochs} epochs), warm-up {warmup}, "
          f"{args.threads} thread(s)", file=sys.stderr)

    trainers = {"mmgen": lambda: train_mmgen(args, args.work, steps, warmup),
                "open_clip": lambda: train_open_clip(args, args.work, args.epochs, warmup)}
    order = ["open_clip", "mmgen"] if args.open_clip_first else ["mmgen", "open_clip"]
    trained = {}
    for name in order:
        trained[name] = trainers[name]()
        print(f"{name} trained in {trained[name][1]:.0f}s", file=sys.stderr)
    (final, mmgen_seconds), (checkpoint, open_clip_seconds) = trained["mmgen"], trained["open_clip"]

    from mmgen.recipes.clip_eval import load_clip

    mmgen_model = load_clip(final)
    open_clip_model = load_open_clip_as_mmgen(checkpoint, mmgen_model.config)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "data": str(args.data),
        "pairs": pairs, "held_out_images": count_rows(args.data / "val.csv"), "config": str(args.config),
        "batch_size": args.batch_size, "steps": steps, "epochs": args.epochs, "warmup_steps": warmup,
        "lr": args.lr, "weight_decay": args.weight_decay, "betas": list(args.betas), "threads": args.threads,
        "parameters": sum(p.numel() for p in mmgen_model.parameters()), "order": order,
        "mmgen": {"seconds": round(mmgen_seconds, 1), **evaluate(mmgen_model, args.data.resolve())},
        "open_clip": {"seconds": round(open_clip_seconds, 1), **evaluate(open_clip_model, args.data.resolve())},
    }
    results["time_ratio_mmgen_over_open_clip"] = round(mmgen_seconds / open_clip_seconds, 3)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    metrics = [name for name in results["mmgen"] if name != "seconds"]
    print(f"{'':<10}{'seconds':>9}" + "".join(f"{name:>16}" for name in metrics))
    for trainer in ("mmgen", "open_clip"):
        print(f"{trainer:<10}{results[trainer]['seconds']:>9.1f}"
              + "".join(f"{results[trainer][name]:>16.4f}" for name in metrics))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
