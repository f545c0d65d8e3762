"""`attnjax lab induction` and `attnjax lab text`: train a recipe, save it, report its heads.

Registered in attnjax/cli.py (``add_parser`` and ``run``); errors a user can fix raise
ValueError, which the command line prints in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(commands) -> None:
    lab = commands.add_parser("lab", help="train a small GPT and watch its heads form",
                              description="Train a small decoder on a recipe, save it in Hugging Face layout "
                                          "and report the heads it grew.")
    recipes = lab.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    induction = recipes.add_parser("induction", help="2-layer model on repeated random tokens (grows induction heads)")
    text = recipes.add_parser("text", help="2-layer character-level model of a UTF-8 text file")
    text.add_argument("file", type=Path, help="the training text (UTF-8)")
    for parser in (induction, text):
        parser.add_argument("--out", type=Path, required=True, help="directory to save the model in")
        parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
        parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default 0)")
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def check_out(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a directory to save the model in.")
    if path.is_dir() and (path / "config.json").exists() and "attnjax_lab" not in (path / "config.json").read_text():
        raise ValueError(f"--out {path} already holds a model not saved by attnjax lab; pick another directory.")


def run(args) -> int:
    from attnjax.lab import recipes

    check_out(args.out)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be a positive number of steps.")
    started = time.perf_counter()
    if args.recipe == "induction":
        result = recipes.train_induction(args.steps, seed=args.seed)
        ids = recipes.induction_probe()
    else:
        if not args.file.is_file():
            raise ValueError(f"{args.file}: no such file; give a UTF-8 text file.")
        result = recipes.train_text(args.file, args.steps, seed=args.seed)
        task = recipes.char_text(args.file, recipes.TEXT.length)
        ids = next(task.batches(16, seed=12345))
    seconds = time.perf_counter() - started
    directory = recipes.save_result(result, args.out)
    heads = recipes.fresh_heads(result, ids)
    print(recipes.head_report(result, heads))
    print(f"\nTrained {int(result.history['step'].max())} steps in {seconds:.0f} s.")
    print(f"Wrote the model to {directory.resolve()} (history in history.csv).")
    print(f"See it: attnjax report --model {directory}")
    return 0
