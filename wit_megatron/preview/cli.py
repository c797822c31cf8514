"""`wit-inspect`: records or packed training samples as WITDataset feeds them, each token with its role and
weight, in the terminal and as HTML, and a summary per dataset (argument parsing; the work is in view,
summary and render)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from wit_megatron.training.arguments import build_parser as training_parser

    train = training_parser()  # the training's defaults, so that a sample here is the sample there
    p = argparse.ArgumentParser(
        prog="wit-inspect", description="Show what each token is trained with: records (--index) or training samples "
        "(--sample) exactly as the dataset class yields them under the given λ, coloured by role with each weight, "
        "record boundaries and every special/template token visible; and a summary per dataset (tokens per role, the "
        "share of targets with non-zero weight, records without a response or of one role throughout). Data options "
        "are examples/pretrain_wit.py's, with its defaults: give the run's values to see the run's samples.")
    p.add_argument("--data-path", nargs="+", required=True, help="prefixes written by wit-preprocess-data ('P' or a blend "
                   "'W1 P1 W2 P2'); --index reads the first")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--index", type=int, nargs="+", default=[], metavar="N",
                      help="record N of the (first) prefix, alone in a sample as the dataset cuts it")
    what.add_argument("--sample", type=int, nargs="+", default=[], metavar="N",
                      help="sample N of the split as training reads it (packed unless --no-packing)")
    p.add_argument("--split-name", choices=("train", "valid"), default="train", help="the split --sample numbers")
    for role in ("prompt", "response", "system", "user", "tool"):
        p.add_argument(f"--lambda-{role}", type=float, default=train.get_default(f"lambda_{role}"),
                       help=f"(default {train.get_default(f'lambda_{role}')})" if role in ("prompt", "response") else
                       "(default: λ_p)")
    p.add_argument("--seq-length", type=int, default=train.get_default("seq_length"))
    p.add_argument("--split", default=train.get_default("split"))
    p.add_argument("--seed", type=int, default=train.get_default("seed"))
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--train-epochs", type=int, default=None)
    p.add_argument("--train-iters", type=int, default=None, help="with --global-batch-size: the run's sample count, which "
                   "numbers samples past the first epoch as the run does (default: --train-epochs epochs)")
    p.add_argument("--global-batch-size", type=int, default=train.get_default("global_batch_size"))
    p.add_argument("--data-cache-path", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the data was preprocessed with)")
    p.add_argument("--format", choices=("auto", "ansi", "plain", "tsv"), default="auto",
                   help="auto: ANSI colours on a terminal (unless NO_COLOR is set), plain markers otherwise")
    p.add_argument("--html", type=Path, default=None, metavar="OUT.html", help="also write a self-contained HTML page")
    p.add_argument("--max-named", type=int, default=20, help="flagged records named per list in the summary")
    return p


def _colour(fmt: str) -> bool:
    if fmt == "auto":
        return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    return fmt == "ansi"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # ViewError, bad λ, bad prefixes: a message, not a traceback
        print(f"wit-inspect: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import json

    from wit_megatron.data.indexed import meta_path
    from wit_megatron.data.loader import parse_blend
    from wit_megatron.preview import render
    from wit_megatron.preview.summary import summarize
    from wit_megatron.preview.view import DatasetOptions, build_records, build_split, record_view, sample_view
    from wit_megatron.roles import RoleWeights

    weights = RoleWeights(args.lambda_prompt, args.lambda_response, args.lambda_system, args.lambda_user, args.lambda_tool)
    prefixes, _ = parse_blend(args.data_path)
    options = DatasetOptions(data_path=args.data_path, role_weights=weights, seq_length=args.seq_length, split=args.split,
                             seed=args.seed, packing=not args.no_packing, train_epochs=args.train_epochs,
                             train_samples=args.train_iters * args.global_batch_size if args.train_iters else None, data_cache_path=args.data_cache_path)
    summaries = [summarize(prefix, weights) for prefix in prefixes]
    views = []
    if args.index:
        dataset = build_records(options, prefixes[0])
        views = [record_view(dataset, i) for i in args.index]
    elif args.sample:
        dataset = build_split(options, args.split_name)
        views = [sample_view(dataset, i, args.split_name) for i in args.sample]
    text = None
    if views or args.html:
        tokenizer_dir = args.tokenizer or json.loads(Path(meta_path(prefixes[0])).read_text()).get("tokenizer")
        text = render.TokenText(_load_tokenizer(tokenizer_dir))
    colour = _colour(args.format)
    out = sys.stdout
    if args.format != "tsv":
        for summary in summaries:
            out.write(render.summary_text(summary, args.max_named))
    for view in views:
        out.write(render.tsv(view, text) if args.format == "tsv" else render.terminal(view, text, colour))
    if args.html:
        subtitle = (f"λ_p {args.lambda_prompt:g}, λ_r {args.lambda_response:g}; --seq-length {args.seq_length}, "
                    f"{'unpacked' if args.no_packing else 'packed'}, --seed {args.seed}, data {' '.join(args.data_path)}")
        page = render.html_page(views, summaries, text, subtitle)
        args.html.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.html.with_name(f".{args.html.name}.tmp{os.getpid()}")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _load_tokenizer(directory: Optional[str]):
    from transformers import AutoTokenizer

    if not directory:
        raise ValueError("the data's meta.json names no tokenizer: give --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {directory!r} cannot be loaded ({e}); give --tokenizer DIR") from None


if __name__ == "__main__":
    sys.exit(main())
