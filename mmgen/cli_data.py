"""`mmgen split-data`: hold out part of a caption table (the work is mmgen/data/split.py; no torch import)."""

from __future__ import annotations

from .cli_types import open_fraction

SPLIT_EPILOG = ("Example: mmgen split-data mine/pairs.csv --val-fraction 0.1 writes mine/pairs.train.csv and "
                "mine/pairs.val.csv; then mmgen train clip --config configs/clip-own-data.yaml --out runs/clip-mine "
                "data.train=mine/pairs.train.csv data.val=mine/pairs.val.csv data.retrieval=mine/pairs.val.csv")


def add_split_command(commands) -> None:
    """Add `mmgen split-data TABLE` to the `mmgen` subcommands."""
    split = commands.add_parser("split-data", help="hold out part of your caption table: TABLE.train / TABLE.val",
                                epilog=SPLIT_EPILOG)
    split.set_defaults(run=run_split)
    split.add_argument("table", help="a .csv, .tsv or .jsonl caption table (image paths relative to its folder)")
    split.add_argument("--val-fraction", type=open_fraction, default=0.1, help="share of rows held out (default 0.1)")
    split.add_argument("--stratify", metavar="COLUMN", help="hold out that share of each value of COLUMN (a label)")
    split.add_argument("--seed", type=int, default=0, help="seeds which rows are held out (default 0)")


def run_split(args) -> None:
    """`mmgen split-data`: write the two tables and say how many rows each holds."""
    from .data.split import split_table

    split = split_table(args.table, val_fraction=args.val_fraction, seed=args.seed, stratify=args.stratify)
    print(f"wrote {split.train} ({split.train_rows} rows) and {split.val} ({split.val_rows} rows); use "
          f"data.train={split.train} data.val={split.val}")
