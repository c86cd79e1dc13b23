"""Diffusion-DPO on the shapes text-to-image model, measured: held-out prompt fidelity (bench/diffusion_fidelity.py's
prompts, read by the judge of bench/judge.py) of the base and after each DPO checkpoint, i.e. against DPO steps.

`mmgen finetune diffusion` with configs/finetune-diffusion-shapes-dpo.yaml (LoRA, objective dpo) trains on pairs of
train shape x colour pairs (winner: the caption's render; loser: the same layout with the wrong colour or shape);
the prompts measured are full captions of held-out pairs, which DPO never saw.

    python bench/diffusion_dpo.py --base runs/diffusion-shapes                    # the figure (needs a trained base)
    python bench/diffusion_dpo.py --base runs/diffusion-shapes --steps 200 --prompts 32
    python bench/diffusion_dpo.py --tiny                                          # end-to-end smoke run, random base

--tiny builds a tiny random-init model and runs every stage on it in a few minutes: it checks the bench, its
figures mean nothing. Results: bench/results/diffusion_dpo.json (diffusion_dpo_tiny.json with --tiny).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusion_fidelity import generate, machine, parse_settings, prompt_attributes
from judge import load_or_train_judge, score

from mmgen import cli
from mmgen.data.shapes import caption
from mmgen.diffusion import TextToImage
from mmgen.finetune import load_adapter
from mmgen.hub import load_as
from mmgen.io import atomic_write_text
from mmgen.pipelines.text2img import TextToImagePipeline
from mmgen.run_folder import RunFolder

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
DPO_CONFIG = REPOSITORY / "configs" / "finetune-diffusion-shapes-dpo.yaml"
COLUMNS = ("shape+colour", "shape", "colour", "size", "position")
LOGGED = ("reward_accuracy", "reward_margin", "winner_error", "loser_error", "winner_error_ratio", "loser_error_ratio")


def tiny_base(folder: Path) -> Path:
    """A tiny random-init 16px TextToImage model folder (for --tiny: exercises the bench, means nothing)."""
    from mmgen.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    from mmgen.diffusion import NoiseSchedule, UNetConfig

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=32, vision=CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=1,
                                                                  heads=2),
                           text=CLIPTextConfig(context_length=16, width=32, layers=1, heads=2)))
    unet = UNetConfig(base_channels=8, channel_multipliers=(1, 2), attention_levels=(False, True), blocks_per_level=1,
                      num_heads=2, groups=4)
    model = TextToImage.from_text_encoder(clip, 16, unet, NoiseSchedule(num_train_timesteps=100))
    model.save_pretrained(folder)
    return folder


def last_logged(records: list[dict], step: int, key: str) -> float | None:
    """The last value of `key` logged at or before `step` (None at step 0 or if never logged)."""
    logged = [r[key] for r in records if r["step"] <= step and key in r]
    return logged[-1] if logged and step else None


def fidelity(model, attributes: list[dict], setting: dict, judge, batch_size: int, seed: int) -> dict:
    """Judge scores of the model's samples of each prompt (one image per prompt)."""
    images = generate(TextToImagePipeline(model), [caption(a) for a in attributes], setting, 1, batch_size, seed)
    return score(judge.predict(images), attributes)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="mmgen-diffusion-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    base = args.base or tiny_base(work / "tiny-base")
    setting = parse_settings(args.setting)[0]
    judge = load_or_train_judge(args.judge_size, args.judge_cache, progress=False)
    attributes = prompt_attributes("heldout", args.prompts, args.seed)

    start = time.perf_counter()
    run_dir = work / "dpo"
    overrides = ["train.progress=false", *args.override]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.tiny:
        overrides += ["data.train=shapes:train:256", "data.val=shapes:val:16", "train.batch_size=8",
                      "train.eval_every=0", "samples.count=0"]
    if cli.main(["finetune", "diffusion", "--config", str(DPO_CONFIG), "--base", str(base), "--out", str(run_dir),
                 *overrides]):
        raise SystemExit("Diffusion-DPO fine-tuning failed")
    training_seconds = round(time.perf_counter() - start, 1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # fidelity of the base (step 0), then of each checkpoint's adapter and of final/ (unless a checkpoint has its step)
    folder = RunFolder(run_dir)
    stages = [(0, None), *folder.checkpoints()]
    last_step = max(r["step"] for r in records)
    if stages[-1][0] != last_step:
        stages.append((last_step, folder.final))
    rows = []
    for step, adapter in stages:
        model = load_as(base, TextToImage)
        if adapter is not None:
            load_adapter(model, adapter)
        started = time.perf_counter()
        figures = fidelity(model.eval(), attributes, setting, judge, args.batch_size, args.seed)
        rows.append({"dpo_steps": step, "fidelity": figures, "seconds": round(time.perf_counter() - started, 1),
                     **{f"train_{key}": last_logged(records, step, f"dpo/{key}") for key in LOGGED},
                     "val_loss": next((r["val/loss"] for r in records if r["step"] == step and "val/loss" in r), None)})
        print(f"step {step}: shape+colour {figures['shape+colour']:.3f}", file=sys.stderr)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "machine": machine(),
            "threads": args.threads, "base": str(base), "tiny": args.tiny, "setting": setting,
            "held_out_prompts": len(attributes), "judge": {"image_size": judge.config.image_size,
                                                           "report": judge.report},
            "training_seconds": training_seconds, "rows": rows, "work": str(work)}


def table(results: dict) -> str:
    """The results as a text table: fidelity per DPO step, training reward accuracy, the policy's winner and loser
    errors as multiples of the reference's (both above 1 is the failure mode), held-out DPO loss."""
    logged = {"reward_accuracy": "reward acc", "winner_error_ratio": "winner err x", "loser_error_ratio": "loser err x",
              "val_loss": "val loss"}
    lines = [f"{'DPO steps':>10}" + "".join(f"{name:>14}" for name in COLUMNS)
             + "".join(f"{label:>14}" for label in logged.values())]
    for row in results["rows"]:
        values = [row[name if name == "val_loss" else f"train_{name}"] for name in logged]
        lines.append(f"{row['dpo_steps']:>10}" + "".join(f"{row['fidelity'][name]:>14.3f}" for name in COLUMNS)
                     + "".join(f"{'':>14}" if value is None else f"{value:>14.3f}" for value in values))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a trained shapes text2img run or model folder")
    parser.add_argument("--tiny", action="store_true", help="a smoke run on a tiny random model (no --base)")
    parser.add_argument("--steps", type=int, help="DPO steps (default: the config's train.max_steps)")
    parser.add_argument("--override", action="append", default=[], help="a config override for the DPO run")
    parser.add_argument("--prompts", type=int, help="held-out prompts (default 64; 8 with --tiny)")
    parser.add_argument("--setting", default="ddim:25:1.5", help="SAMPLER:STEPS:GUIDANCE of the samples")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--judge-size", type=int, default=32)
    parser.add_argument("--judge-cache", type=Path, help="default: bench/results/judge-<size>px/")
    parser.add_argument("--work", type=Path, help="folder for the DPO run (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args()
    if (args.base is None) == (not args.tiny):
        parser.error("give --base RUN (a trained shapes text2img model) or --tiny, not both")
    if args.tiny:
        args.prompts, args.steps = args.prompts or 8, args.steps or 4
        args.setting = "ddim:4:1.5" if args.setting == parser.get_default("setting") else args.setting
        args.override = ["train.checkpoint_every=2", *args.override]
    args.prompts = args.prompts or 64
    results = run(args)
    print(table(results))
    out = args.out or RESULTS / ("diffusion_dpo_tiny.json" if args.tiny else "diffusion_dpo.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
