"""Recipe fingerprints: proof that a refactoring of mmgen/recipes/ changed no behaviour.

Every recipe of `mmgen train` and `mmgen finetune` runs through the real CLI, in a subprocess, for a few steps on
small data with a fixed seed and a shrunk evaluation; the fingerprint of a run is its metrics.jsonl (without the
keys that depend on wall time or on where the run lives) and the sha256 of every file it wrote: final/, the last
checkpoint (model or adapter, optimizer, EMA, RNG, trainer state), the sample grids and config.yaml. Two resume legs
(lm and clip, more in RESUMED) copy a finished run, delete its final/, continue it with --resume and fingerprint it
again. Take one fingerprint before the refactoring and one after, then compare them:

    python bench/recipe_fingerprints.py --out /tmp/fp-before.json      # 4-5 min on 2 busy CPU cores (2 min of CPU)
    python bench/recipe_fingerprints.py --out /tmp/fp-after.json
    python bench/recipe_fingerprints.py --compare /tmp/fp-before.json /tmp/fp-after.json   # exit code 1 if any differ
    python bench/recipe_fingerprints.py --out /tmp/fp.json --only diffusion finetune-lm --keep-runs /tmp/fp-runs

--only runs the named legs and whatever they need (diffusion needs clip; legs' names: LEGS below). The runs are
made in a temporary folder (--keep-runs DIR keeps them in DIR), which is the working directory of every command so
that the paths recorded in the runs (model.text_encoder, base, data.path) are the same wherever it is. Each command
runs alone, with OMP_NUM_THREADS=1 and CUDA_VISIBLE_DEVICES="" (the CPU only: bit-identical results need the same
kernels), PYTHONHASHSEED=0 and this repository first on PYTHONPATH; a failing command is reported with the tail of
its stderr, and the script then exits non-zero. Fingerprints are comparable only between runs on the same machine
and library versions (meta names torch's) and with the same LM text: to compare two checkouts in different places,
pass both the same --text (a checkout without ../shared/data beside it trains on a generated text instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs"
SHAKESPEARE = REPOSITORY.parent / "shared" / "data" / "tinyshakespeare.txt"
CORPUS = "corpus.txt"  # the LM text, in the work folder (Tiny Shakespeare, or a generated text without it)
LABELLED = "labelled"  # the clip-classifier's image folder, in the work folder
CLASSIFIER_CONFIG = "classifier.yaml"  # the clip-classifier's config (no shipped one), in the work folder
STDERR_TAIL = 25  # lines of a failed command's stderr to show

# every run: 4 steps (2 of warm-up, 2 of cosine decay), an evaluation at 2 and 4, a checkpoint at 2 (the one a resume
# continues from), a record per step
STEPS = ["train.max_steps=4", "train.warmup_steps=2", "train.eval_every=2", "train.log_every=1",
         "train.checkpoint_every=2", "train.batch_size=8", "train.eval_batches=2", "train.num_workers=0",
         "train.progress=false", "train.tensorboard=false"]
SHAPES = ["data.train=shapes:train:64", "data.val=shapes:val:16"]
HEART_SHAPES = ["data.train=shapes:train:64:extra=heart", "data.val=shapes:val:16:extra=heart"]
GRID = ["samples.count=2", "samples.steps=2"]  # two prompts (or images), two DDIM steps
CLIP_EVALUATION = ["data.eval_samples=16"]  # zero-shot images and retrieval captions


@dataclass
class Leg:
    """One CLI command: `mmgen COMMAND RECIPE --config CONFIG --out NAME [--base BASE] OVERRIDES`."""

    name: str  # the run folder (in the work folder) and the fingerprint's key
    command: str  # train or finetune
    recipe: str
    config: str  # a file in configs/, or one written into the work folder
    overrides: list[str] = field(default_factory=list)
    base: str | None = None  # finetune: the leg whose run is adapted
    needs: tuple[str, ...] = ()  # legs whose runs the overrides name


LEGS = [
    Leg("lm", "train", "lm", "lm-shakespeare-char.yaml", STEPS + [f"data.path={CORPUS}"]),
    Leg("clip", "train", "clip", "clip-shapes.yaml", STEPS + SHAPES + CLIP_EVALUATION),
    Leg("vae", "train", "vae", "vae-shapes.yaml",
        STEPS + SHAPES + ["evaluation.grid_images=2", "evaluation.scaling_batches=1"]),
    Leg("diffusion", "train", "diffusion", "diffusion-shapes.yaml", STEPS + SHAPES + GRID + ["model.text_encoder=clip"],
        needs=("clip",)),
    Leg("latent-diffusion", "train", "latent-diffusion", "ldm-shapes.yaml",
        STEPS + SHAPES + GRID + ["model.text_encoder=clip", "model.vae=vae"], needs=("clip", "vae")),
    Leg("prior", "train", "prior", "prior-shapes.yaml", STEPS + SHAPES + ["samples.count=4", "samples.steps=2",
                                                                         "model.clip=clip"], needs=("clip",)),
    Leg("decoder", "train", "decoder", "decoder-shapes.yaml", STEPS + SHAPES + GRID + ["model.clip=clip"],
        needs=("clip",)),
    Leg("finetune-lm", "finetune", "lm", "finetune-lm-shakespeare-lora.yaml", STEPS + [f"data.path={CORPUS}"],
        base="lm"),
    Leg("finetune-clip", "finetune", "clip", "finetune-clip-shapes-lora.yaml",
        STEPS + HEART_SHAPES + CLIP_EVALUATION, base="clip"),
    # the shipped config's 8 fixed prompts (4 of the new shape) stay: samples.count does not shorten a prompt list
    Leg("finetune-diffusion", "finetune", "diffusion", "finetune-diffusion-shapes-lora.yaml",
        STEPS + HEART_SHAPES + ["samples.steps=2"], base="diffusion"),
    Leg("finetune-clip-classifier", "finetune", "clip-classifier", CLASSIFIER_CONFIG, STEPS, base="clip"),
]
RESUMED = ("lm", "clip")  # each also gets a leg NAME-resume: its run copied, final/ deleted, continued with --resume
RESUME_SUFFIX = "-resume"
ALL_NAMES = [leg.name for leg in LEGS] + [name + RESUME_SUFFIX for name in RESUMED]


class LegFailed(Exception):
    """A CLI command exited non-zero; the message holds its stderr's tail."""


# ---------------------------------------------------------------- inputs
def write_inputs(work: Path, text: Path | None) -> None:
    """The LM text (`text`, else a generated one) and the labelled image folder + config of clip-classifier, into
    the work folder."""
    if text is not None:
        shutil.copyfile(text, work / CORPUS)
    else:  # a fixed pseudo-text: the same characters for the base and its fine-tuning
        rng = random.Random(0)
        words = ["to", "be", "or", "not", "the", "king", "shall", "love", "night", "thou", "my", "lord", "and"]
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(8000))
        (work / CORPUS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_labelled_folder(work / LABELLED)
    config = {"method": "full", "data": {"train": LABELLED}}  # JSON is YAML; train.* comes from STEPS
    (work / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_labelled_folder(folder: Path, per_class: int = 6, size: int = 32) -> None:
    """Three classes of 32x32 PNGs (a red circle, a blue square, a green triangle at seeded places), drawn with PIL."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for name, colour in (("red circle", (220, 30, 30)), ("blue square", (30, 60, 220)),
                         ("green triangle", (30, 180, 60))):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            image = Image.new("RGB", (size, size), (0, 0, 0))
            draw = ImageDraw.Draw(image)
            extent = rng.randint(10, 18)
            left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
            box = (left, top, left + extent, top + extent)
            if name == "red circle":
                draw.ellipse(box, fill=colour)
            elif name == "blue square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)],
                             fill=colour)
            image.save(folder / name / f"{index}.png")


# ---------------------------------------------------------------- running
def environment() -> dict[str, str]:
    """The commands' environment: one thread, no GPU, a fixed hash seed, this repository's mmgen."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_mmgen_source() -> None:
    """Refuse to run when the commands would import an mmgen other than this repository's."""
    command = [sys.executable, "-c", "import mmgen; print(mmgen.__file__)"]
    found = subprocess.run(command, cwd=tempfile.gettempdir(), env=environment(), capture_output=True, text=True,
                           check=False).stdout.strip()
    if not found or Path(found).resolve().parent != (REPOSITORY / "mmgen").resolve():
        sys.exit(f"the commands would import mmgen from {found or 'nowhere'}, not from {REPOSITORY}")


def run_cli(arguments: list[str], work: Path, log_name: str) -> tuple[float, float]:
    """Run `python -m mmgen.cli ARGUMENTS` in `work` (output in work/logs/); (wall, CPU) seconds, or LegFailed."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    with open(logs / f"{log_name}.out", "w") as stdout, open(logs / f"{log_name}.err", "w") as stderr:
        code = subprocess.run([sys.executable, "-m", "mmgen.cli", *arguments], cwd=work, env=environment(),
                              stdout=stdout, stderr=stderr, check=False).returncode
    if code != 0:
        tail = (logs / f"{log_name}.err").read_text(errors="replace").splitlines()[-STDERR_TAIL:]
        raise LegFailed(f"exit code {code}: mmgen {' '.join(arguments)}\n" + "\n".join(tail))
    return time.perf_counter() - start, _children_cpu_seconds() - cpu_start


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_leg(leg: Leg, work: Path) -> tuple[float, float]:
    """Make the leg's run folder work/NAME."""
    config = work / leg.config if leg.config == CLASSIFIER_CONFIG else CONFIGS / leg.config
    arguments = [leg.command, leg.recipe, "--config", str(config), "--out", leg.name]
    if leg.base is not None:
        arguments += ["--base", leg.base]
    return run_cli(arguments + leg.overrides, work, leg.name)


def run_resume(leg: Leg, work: Path) -> tuple[float, float]:
    """Copy the leg's finished run, delete its final/ and continue it from its last checkpoint."""
    name = leg.name + RESUME_SUFFIX
    shutil.copytree(work / leg.name, work / name)
    shutil.rmtree(work / name / "final")
    return run_cli([leg.command, leg.recipe, "--resume", name], work, name)


# ---------------------------------------------------------------- fingerprints
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clean_record(record: dict) -> dict:
    """A metrics record without what depends on wall time (throughput/*) or on where the run lives (a logged path,
    such as samples/grid, keeps only its file name)."""
    cleaned = {}
    for key, value in record.items():
        if key.startswith("throughput/"):
            continue
        if isinstance(value, str) and ("/" in value or os.sep in value):
            value = Path(value).name
        cleaned[key] = value
    return cleaned


def fingerprint(run: Path) -> dict:
    """The run's cleaned metrics records and the sha256 of every other file it holds (by path in the run)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    files = {}
    for path in sorted(run.rglob("*")):
        relative = path.relative_to(run).as_posix()
        if path.is_file() and relative != "metrics.jsonl" and not relative.startswith("tensorboard/"):
            files[relative] = sha256(path)
    if not any(name.startswith("final/") for name in files):
        raise LegFailed(f"{run} has no final/ files")
    return {"metrics": [clean_record(record) for record in records], "files": files}


def with_needs(names: list[str]) -> list[str]:
    """`names` and every leg they need (their bases, the runs their overrides name, the run a resume copies), in
    LEGS order."""
    by_name = {leg.name: leg for leg in LEGS}
    wanted, pending = set(), list(names)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        wanted.add(name)
        leg = by_name.get(name.removesuffix(RESUME_SUFFIX))
        pending += [leg.name] if name.endswith(RESUME_SUFFIX) else [*leg.needs, *filter(None, [leg.base])]
    return [name for name in ALL_NAMES if name in wanted]


def take_fingerprints(names: list[str], work: Path) -> tuple[dict, dict, dict]:
    """Run the legs in order: ({name: fingerprint}, {name: (wall, CPU) seconds}, {name: why it failed}); a leg whose
    needs failed is not run."""
    by_name = {leg.name: leg for leg in LEGS}
    results, seconds, failures = {}, {}, {}
    for name in names:
        leg = by_name[name.removesuffix(RESUME_SUFFIX)]
        needs = [leg.name] if name.endswith(RESUME_SUFFIX) else [*leg.needs, *filter(None, [leg.base])]
        missing = [need for need in needs if need not in results]
        try:
            if missing:
                raise LegFailed(f"not run: {', '.join(missing)} failed")
            seconds[name] = run_resume(leg, work) if name.endswith(RESUME_SUFFIX) else run_leg(leg, work)
            results[name] = fingerprint(work / name)
        except LegFailed as error:
            failures[name] = str(error)
            print(f"{name}: FAILED, {error}", flush=True)
            continue
        wall, cpu = seconds[name]
        print(f"{name}: {wall:.1f} s ({cpu:.1f} s CPU), {len(results[name]['metrics'])} records, "
              f"{len(results[name]['files'])} files", flush=True)
    for name in names:  # a resume that does not reproduce the uninterrupted run is worth knowing (not a failure)
        if name.endswith(RESUME_SUFFIX) and name in results:
            original = results[name.removesuffix(RESUME_SUFFIX)]
            same = (results[name]["metrics"] == original["metrics"]
                    and all(original["files"].get(path) == digest for path, digest in results[name]["files"].items()
                            if path.startswith("final/")))
            print(f"{name}: {'reproduces' if same else 'DIFFERS FROM'} the uninterrupted run (metrics and final/)")
    return results, seconds, failures


def meta() -> dict:
    """What the fingerprints depend on besides the code: library versions and the machine."""
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "repository": str(REPOSITORY)}


# ---------------------------------------------------------------- comparing
def first_difference(a: dict, b: dict) -> str | None:
    """The first difference of two fingerprints of one recipe, in words; None when identical."""
    if "error" in a or "error" in b:
        if a == b:
            return None
        if "error" in a and "error" in b:
            return f"fails in both, differently: A {a['error']!r}, B {b['error']!r}"
        return f"fails in {'A' if 'error' in a else 'B'}: {a.get('error') or b.get('error')}"
    records_a, records_b = a["metrics"], b["metrics"]
    for index, (record_a, record_b) in enumerate(zip(records_a, records_b)):
        where = f"metrics record {index} (step {record_a.get('step')})"
        for key in sorted(set(record_a) | set(record_b)):
            if key not in record_a or key not in record_b:
                return f"{where}: key {key!r} only in {'A' if key in record_a else 'B'}"
            if json.dumps(record_a[key]) != json.dumps(record_b[key]):  # exact, NaN included
                return f"{where} key {key!r}: {record_a[key]!r} vs {record_b[key]!r}"
    if len(records_a) != len(records_b):
        return f"metrics: {len(records_a)} records vs {len(records_b)}"
    for path in sorted(set(a["files"]) | set(b["files"])):
        if path not in a["files"] or path not in b["files"]:
            return f"file {path} only in {'A' if path in a['files'] else 'B'}"
        if a["files"][path] != b["files"][path]:
            return f"file {path}: sha256 {a['files'][path][:12]}... vs {b['files'][path][:12]}..."
    return None


def compare(path_a: Path, path_b: Path) -> int:
    """Print per recipe 'identical' or its first difference; 1 if anything differs."""
    document_a, document_b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    recipes_a, recipes_b = document_a["recipes"], document_b["recipes"]
    for key in ("corpus_sha256", "torch", "python", "machine"):  # differences that are not the code's
        if document_a["meta"].get(key) != document_b["meta"].get(key):
            print(f"note: {key} differs: {document_a['meta'].get(key)} vs {document_b['meta'].get(key)}")
    differs = False
    for name in [*recipes_a, *[name for name in recipes_b if name not in recipes_a]]:
        if name not in recipes_a or name not in recipes_b:
            difference = f"only in {'A' if name in recipes_a else 'B'}"
        else:
            difference = first_difference(recipes_a[name], recipes_b[name])
        differs |= difference is not None
        print(f"{name}: {difference or 'identical'}")
    return int(differs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="fingerprint file to write (JSON)")
    parser.add_argument("--only", nargs="+", choices=ALL_NAMES, metavar="NAME",
                        help=f"these legs (and what they need): {', '.join(ALL_NAMES)}")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE if SHAKESPEARE.is_file() else None,
                        help="the LM text (default: ../shared/data/tinyshakespeare.txt beside the repository if "
                             "there, else a generated text)")
    parser.add_argument("--keep-runs", type=Path, metavar="DIR", help="make the runs in DIR (new) and keep them")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two fingerprint files")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("--out FILE or --compare A B is required")
    if args.keep_runs is not None and args.keep_runs.exists() and any(args.keep_runs.iterdir()):
        parser.error(f"--keep-runs {args.keep_runs} already holds files")

    check_mmgen_source()
    work = args.keep_runs or Path(tempfile.mkdtemp(prefix="mmgen-fingerprints-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        write_inputs(work, args.text)
        corpus = sha256(work / CORPUS)
        names = with_needs(args.only or ALL_NAMES)
        results, seconds, failures = take_fingerprints(names, work)
    finally:
        if args.keep_runs is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start
    # a failure is kept as its first line (the command), so that --compare reports it
    recipes = {name: results.get(name) or {"error": failures[name].splitlines()[0]} for name in names}
    timing = {name: {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)} for name, (wall, cpu) in seconds.items()}
    document = {"meta": {**meta(), "corpus_sha256": corpus, "seconds": timing, "total_seconds": round(total, 1)},
                "recipes": recipes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}: {len(results)} of {len(names)} legs in {total:.0f} s"
          + (f" (runs kept in {work})" if args.keep_runs else ""))
    if failures:
        print(f"{len(failures)} failed: {', '.join(failures)} (their stderr above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
