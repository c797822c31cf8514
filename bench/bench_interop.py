"""Interoperability with Megatron-Bridge on one HF model, both directions: timed, and checked bitwise.

    nice -n 5 .venv312/bin/python bench/bench_interop.py \
        --hf /root/.cache/wit-megatron/smollm2-135m-instruct-0.1.2-transformers5.25.0 \
        [--workdir /tmp/wit-interop] [--peer-python .venv312/bin/python --peer-pythonpath /work/peer-overlay] \
        [--skip-bridge-import --bridge-save /work/bridge_smol]

Each step runs as its own process under GNU `/usr/bin/time -v` (wall seconds; max RSS of the largest
single process); logs are kept in WORKDIR/logs, the outputs in WORKDIR.
  1 Bridge HF -> Megatron: bench/peer_megatron_bridge.import_hf (AutoBridge, local layer spec, CPU),
    saving HF's tokenizer too (hf_tokenizer_path=HF) -> BRIDGE_SAVE (skipped with --skip-bridge-import)
  2 ours Megatron -> HF of BRIDGE_SAVE, without --hf-config -> out-a
  3 ours HF -> Megatron -> ours
  4 Bridge's own export of our checkpoint, as a user would do it: AutoBridge.from_hf_pretrained(HF)
    .export_ckpt(CKPT, out-b), which reads a Megatron-LM checkpoint's `args` (common state) through its
    Megatron-LM compatibility path. It is tried as is first; each failure adds the next workaround in
    FIXES (all patches in this process, since export_ckpt has no option for them) until it succeeds.
    Always on: Megatron-Core's CPU layer (wit_megatron.runtime.cpu.enable; Bridge's Megatron-LM model path
    calls module.cuda(torch.cuda.current_device())), but not cpu_setup()'s process group: export_ckpt opens
    its own one-rank gloo group ("trying to initialize the default process group twice!").
Checks: out-a and out-b against HF, every tensor bitwise (same names, dtypes, shapes, bytes);
tokenizer.json byte-equal; config.json keys that differ. Prints one table: per direction, ours vs
Bridge's wall time and max RSS with ours/Bridge ratios.
Needs: GNU time; this project's interpreter (safetensors, torch); --peer-python with megatron-bridge
importable from --peer-pythonpath (bench/peer_megatron_bridge.py, docs/convert.md "Peer converter").
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_convert import _fresh  # noqa: E402  (remove the output, sync dirty pages)

FIXES = {
    "iter-dir": "pass CKPT/<iteration dir> (Bridge looks only for iter_* folders; ours is Megatron-LM's release/)",
    "te-off": "args: TE fusions off, transformer_impl local (no Transformer Engine on CPU; as import_hf's provider)",
    "model-type": "model_type='gpt' (AutoBridge.load_megatron_model passes none; a Megatron-LM checkpoint needs it)",
}
TE_OFF = dict(apply_rope_fusion=False, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
              bias_swiglu_fusion=False, bias_gelu_fusion=False, bias_dropout_fusion=False,
              no_persist_layer_norm=True, transformer_impl="local")


# ---- run by --peer-python: `bench_interop.py peer import HF OUT` / `peer export HF CKPT OUT FIX,FIX`
def peer_import(hf: str, out: str) -> None:
    from bench.peer_megatron_bridge import cpu_setup, import_auto_bridge, import_hf

    auto_bridge = import_auto_bridge()
    cpu_setup()
    save = auto_bridge.save_megatron_model  # import_hf saves no tokenizer: save HF's
    auto_bridge.save_megatron_model = lambda self, model, path, **kw: save(self, model, path,
                                                                         **{**kw, "hf_tokenizer_path": hf})
    import_hf(auto_bridge, hf, out)


def peer_export(hf: str, ckpt: str, out: str, fixes: list[str]) -> None:
    from bench.peer_megatron_bridge import import_auto_bridge

    auto_bridge = import_auto_bridge()
    from wit_megatron.runtime import cpu

    cpu.enable()
    import megatron.bridge.training.mlm_compat.arguments as mlm_compat
    import megatron.bridge.training.model_load_save as load_save

    read_args, load = mlm_compat._load_args_from_checkpoint, load_save.load_megatron_model

    def patched_args(path):
        args = read_args(path)
        if "te-off" in fixes:
            vars(args).update(TE_OFF)
        return args

    if "te-off" in fixes:
        mlm_compat._load_args_from_checkpoint = patched_args
    if "model-type" in fixes:
        load_save.load_megatron_model = lambda *a, **kw: load(*a, **{**kw, "model_type": "gpt"})
    path = Path(ckpt)
    if "iter-dir" in fixes:
        tracker = (path / "latest_checkpointed_iteration.txt").read_text().strip()
        path = path / (tracker if tracker == "release" else f"iter_{int(tracker):07d}")
    auto_bridge.from_hf_pretrained(hf).export_ckpt(str(path), out, show_progress=False)


# ---- the bench
def timed(label: str, cmd: list[str], log: Path, output: Path, env: dict | None = None) -> dict:
    """`cmd` under /usr/bin/time -v (its report to a file of its own, the program's output to `log`)."""
    _fresh(output)
    report = log.with_suffix(".time")
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    fields = dict(line.strip().rsplit(": ", 1) for line in report.read_text().splitlines() if ": " in line)
    clock = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    wall = sum(float(p) * 60**i for i, p in enumerate(reversed(clock)))
    rss = int(fields["Maximum resident set size (kbytes)"]) * 1024
    return {"label": label, "ok": rc == 0, "wall_s": wall, "rss": rss, "log": log}


def last_traceback(log: Path) -> str:
    text = log.read_text().replace("[rank0]: ", "")
    return text[text.rfind("Traceback (most recent call last)"):].strip() if "Traceback" in text else text[-2000:]


def safetensors_of(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: directory / "model.safetensors" for k in f.keys()}


def compare(out: Path, hf: Path) -> list[str]:
    """Lines describing `out` against `hf`: tensors bitwise, tokenizer.json, config.json."""
    import torch
    from safetensors import safe_open

    ours, ref = safetensors_of(out), safetensors_of(hf)
    only_out, only_hf = sorted(ours.keys() - ref.keys())[:5], sorted(ref.keys() - ours.keys())[:5]
    lines = [f"names: {len(ours)} vs {len(ref)}" + (f"; only in output {only_out}, only in HF {only_hf}"
                                                      if only_out or only_hf else "")]
    bad = []
    for name in sorted(ours.keys() & ref.keys()):
        with safe_open(ours[name], "pt") as a, safe_open(ref[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.reshape(-1).view(torch.uint8),
                                                                       y.reshape(-1).view(torch.uint8)):
            bad.append(f"{name} ({x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)})")
    same = len(ours.keys() & ref.keys()) - len(bad)
    lines.append(f"tensors bitwise equal: {same}/{len(ref)}" + (f"; differ: {bad[:5]}" if bad else ""))
    tok = out / "tokenizer.json"
    same_tok = tok.exists() and filecmp.cmp(tok, hf / "tokenizer.json", shallow=False)
    lines.append("tokenizer.json: " + ("equal" if same_tok else "DIFFERS" if tok.exists() else "missing"))
    a, b = (json.loads((d / "config.json").read_text()) for d in (out, hf))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    lines.append("config.json: " + ("same values" if not keys else "differs in " + ", ".join(
        f"{k} ({a.get(k, '-')!r} vs {b.get(k, '-')!r})" for k in keys)))
    ok = ours.keys() == ref.keys() and not bad and same_tok
    return [("PASS" if ok else "FAIL") + " (tensors, tokenizer)"] + lines


def main() -> None:
    if sys.argv[1:2] == ["peer"]:
        action, *rest = sys.argv[2:]
        if action == "import":
            return peer_import(*rest)
        return peer_export(*rest[:3], [f for f in rest[3].split(",") if f])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wit-interop"))
    parser.add_argument("--peer-python", default=str(ROOT / ".venv312/bin/python"))
    parser.add_argument("--peer-pythonpath", default="/work/peer-overlay")
    parser.add_argument("--skip-bridge-import", action="store_true", help="reuse --bridge-save instead of step 1")
    parser.add_argument("--bridge-save", type=Path, help="Bridge's save of --hf (default WORKDIR/bridge-save)")
    args = parser.parse_args()
    hf, work = args.hf.resolve(), args.workdir.resolve()
    bridge_save = (args.bridge_save or work / "bridge-save").resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    peer_env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.peer_pythonpath, str(ROOT)]))
    me, py = str(Path(__file__).resolve()), sys.executable
    runs = {}
    if not args.skip_bridge_import:
        runs["bridge_import"] = timed("1 Bridge HF -> Megatron",
                                      [args.peer_python, me, "peer", "import", str(hf), str(bridge_save)],
                                      logs / "1-bridge-import.log", bridge_save, peer_env)
        if not runs["bridge_import"]["ok"]:
            sys.exit(f"step 1 failed:\n{last_traceback(runs['bridge_import']['log'])}")
    runs["ours_export"] = timed("2 ours Megatron -> HF", [py, str(ROOT / "tools/convert_megatron_to_hf.py"),
                                "--megatron", str(bridge_save), "--out", str(work / "out-a")],
                                logs / "2-ours-export.log", work / "out-a")
    runs["ours_import"] = timed("3 ours HF -> Megatron", [py, str(ROOT / "tools/convert_hf_to_megatron.py"),
                                "--hf", str(hf), "--out", str(work / "ours")],
                                logs / "3-ours-import.log", work / "ours")
    attempts = []
    for n in range(len(FIXES) + 1):
        fixes = list(FIXES)[:n]
        attempts.append(timed(f"4 Bridge export_ckpt [{','.join(fixes) or 'as is'}]",
                              [args.peer_python, me, "peer", "export", str(hf), str(work / "ours"), str(work / "out-b"),
                               ",".join(fixes)], logs / f"4-bridge-export-{n}.log", work / "out-b", peer_env))
        if attempts[-1]["ok"]:
            runs["bridge_export"] = attempts[-1]
            break
    checks = {"out-a (2: ours from Bridge's save)": compare(work / "out-a", hf)}
    if "bridge_export" in runs:
        checks["out-b (4: Bridge's export_ckpt of ours)"] = compare(work / "out-b", hf)

    gib = 1024**3
    print(f"model: {hf}; Bridge save: {bridge_save}; workdir: {work}")
    print(f"{'direction':16} {'ours s':>8} {'Bridge s':>9} {'ours/Bridge':>12} {'ours RSS GiB':>13} "
          f"{'Bridge RSS GiB':>15} {'ours/Bridge':>12}")
    for direction, ours, peer in (("HF -> Megatron", "ours_import", "bridge_import"),
                                  ("Megatron -> HF", "ours_export", "bridge_export")):
        o, b = runs[ours], runs.get(peer)  # no Bridge run: skipped (step 1) or failed (step 4)
        peer_s, ratio_s, peer_gib, ratio_rss = ((f"{b['wall_s']:9.2f}", f"{o['wall_s'] / b['wall_s']:12.2f}",
                                                 f"{b['rss'] / gib:15.2f}", f"{o['rss'] / b['rss']:12.2f}") if b else
                                                (f"{'-':>9}", f"{'-':>12}", f"{'-':>15}", f"{'-':>12}"))
        print(f"{direction:16} {o['wall_s']:8.2f} {peer_s} {ratio_s} {o['rss'] / gib:13.2f} {peer_gib} {ratio_rss}")
    print("runs (GNU time -v: wall s, max RSS GiB of the largest process):")
    for r in [runs.get("bridge_import"), runs["ours_export"], runs["ours_import"], *attempts]:
        if r:
            print(f"  {r['label']:60} {r['wall_s']:7.2f} s {r['rss'] / gib:6.2f} GiB  {'ok' if r['ok'] else 'FAILED'}")
    for name, lines in checks.items():
        print(f"check {name}: " + "\n    ".join(lines))
    for fix in list(FIXES)[:len(attempts) - 1]:  # those of the last attempt
        print(f"workaround {fix}: {FIXES[fix]}")
    for r in attempts:
        if not r["ok"]:
            print(f"\n{r['label']} failed ({r['log']}):\n{last_traceback(r['log'])}")


if __name__ == "__main__":  # Bridge's saver may start a subprocess
    main()
