"""Greedy continuations of one held-out prompt by two Hugging Face models (before and after fine-tuning),
printed side by side.

    python examples/compare_generations.py --base HF_DIR --tuned HF_DIR --records RECORDS.jsonl --index -1
"""

import argparse
import json
import shutil
import textwrap
from pathlib import Path

import torch


def greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # The text WIT trains the model to continue (the authors' paper format, data/tokenize.PaperEncoder):
    # the prompt less one trailing space, then the space that joins prompt and response.
    text = (prompt[:-1] if prompt.endswith(" ") else prompt) + " "
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:]
    ended = tokenizer.eos_token_id is not None and bool((new == tokenizer.eos_token_id).any())
    return tokenizer.decode(new, skip_special_tokens=True) + ("\n[EOS]" if ended else "")


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    def column(text: str) -> list[str]:
        return [piece for line in text.splitlines() or [""] for piece in (textwrap.wrap(line, width) or [""])]

    a, b = column(left), column(right)
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    rows += [f"{x:<{width}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the model before fine-tuning (HF directory)")
    p.add_argument("--tuned", type=Path, required=True, help="the fine-tuned model (HF directory)")
    p.add_argument("--records", type=Path, required=True, help="{prompt, response} JSONL records")
    p.add_argument("--index", type=int, default=-1, help="which record's prompt (default: the last, held out by --split)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    prompt = records[args.index]["prompt"]
    width = max(30, (shutil.get_terminal_size((160, 20)).columns - 3) // 2)
    print(f"held-out prompt (record {args.index % len(records)} of {args.records}):\n{prompt}")
    base, tuned = (greedy(d, prompt, args.max_new_tokens) for d in (args.base, args.tuned))
    print(side_by_side(base, tuned, ("base model, greedy", "WIT-tuned model, greedy"), width))


if __name__ == "__main__":
    main()
