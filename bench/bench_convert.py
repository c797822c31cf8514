"""Benchmark both conversion directions against plain copies of the same bytes and a peer converter.

Generates a synthetic Llama-architecture HF checkpoint (random weights, sharded safetensors) of about
--gb gigabytes, then runs, each as its own process measured with GNU time (wall time, peak RSS):
the limits (`cp -r`, which copies inside the kernel with copy_file_range; `dd` through user space;
`dd conv=fsync`, as durable as megatron-core's writer, which fsyncs every file), the interpreter +
imports of each direction alone (its fixed cost, the same for any model size), HF -> Megatron,
Megatron -> HF, and Megatron-Bridge's AutoBridge (bench/peer_megatron_bridge.py) when `--peer-python`
can import it. Prints ratios: time / copy time, time / durable copy time, (time - the direction's
imports) / durable copy time, peak memory / model bytes (and / largest layer), and GNU time's peak RSS
of the largest single process. HF -> Megatron also runs with --dtype cast to the other dtype, which
holds the cast tensors until the save. Each row is the shortest of --repeats timed runs; peak memory
comes from one more run.

    python bench/bench_convert.py --gb 3 --repeats 3 --workdir /tmp/wit-bench \
        [--peer-python /work/venv312/bin/python --peer-pythonpath /work/venv312/peer-overlay]
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(directory: Path, gb: float, dtype: str) -> dict:
    """A Llama config scaled (layers) to about `gb` GB, written shard by shard with random weights."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    hidden, ffn, heads, kv_heads, vocab = 2048, 5632, 16, 4, 32000
    head_dim = hidden // heads
    element = torch.tensor([], dtype=torch_dtype).element_size()
    layer_shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
    }
    layer_bytes = sum(torch.Size(s).numel() for s in layer_shapes.values()) * element
    embed_bytes = 2 * vocab * hidden * element
    layers = max(1, round((gb * 1e9 - embed_bytes) / layer_bytes))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": dtype,
    }
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    def rand(shape):
        return (0.02 * torch.randn(shape, generator=gen)).to(torch_dtype)

    shard("embed.safetensors", {"model.embed_tokens.weight": rand((vocab, hidden)), "model.norm.weight": rand((hidden,)),
                                "lm_head.weight": rand((vocab, hidden))})
    for i in range(layers):
        shard(f"layer-{i:03d}.safetensors", {f"model.layers.{i}.{k}": rand(s) for k, s in layer_shapes.items()})
    total = embed_bytes + layers * layer_bytes + hidden * element
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"bytes": total, "layer_bytes": layer_bytes, "layers": layers}


def tree_pss(root: int) -> tuple[int, int]:
    """(all, anonymous) proportional set size in bytes, summed over process `root` and its
    descendants, from /proc/PID/smaps_rollup. The rest of `all` is file-backed: pages of memory-mapped
    files (the input model's safetensors, mapped read-only), clean page cache the kernel can reclaim."""
    import psutil

    try:
        pids = [root] + [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = anon = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("Pss:", "Pss_Anon:")))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        total += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        anon += int(fields.get("Pss_Anon", "0 kB").split()[0]) * 1024
    return total, anon


def measure(label: str, cmd: list[str], env: dict | None = None, output: Path | None = None, repeats: int = 1) -> dict:
    """Run `cmd` `repeats` times under GNU time for the shortest wall time and the largest peak RSS of
    its largest single process, then once more, without GNU time, for the peak memory of its whole
    process tree (`tree_pss`, sampled every 20 ms). The sampled run is kept apart because reading
    smaps walks every mapped page: on this 2-core machine it slowed an 8 GB conversion from ~11.5 s
    to ~15 s. Before each run `output` is removed and dirty pages of earlier runs are flushed, so that
    no run pays for another's writeback. (On this VM the first write into memory not touched for a
    while can be several times slower than the next: the shortest of a few runs is the comparable
    figure.)"""
    walls, rss = [], []
    for _ in range(repeats):
        _fresh(output)
        proc = subprocess.run(["/usr/bin/time", "-f", "WITBENCH %e %M", *cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        wall, kib = proc.stderr.rsplit("WITBENCH ", 1)[1].split()
        walls.append(float(wall))
        rss.append(int(kib) * 1024)
    _fresh(output)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = anon_peak = 0
    while proc.poll() is None:
        total, anon = tree_pss(proc.pid)
        peak, anon_peak = max(peak, total), max(anon_peak, anon)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed in its memory-sampled run")
    return {"label": label, "wall_s": min(walls), "peak_mem": peak, "peak_anon": anon_peak, "peak_rss": max(rss)}


def _fresh(output: Path | None) -> None:
    if output is not None:
        shutil.rmtree(output, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def dd_copy(source: Path, dest: Path, fsync: bool) -> list[str]:
    """Each file read into user space and written in 64 MiB blocks (optionally fsynced): a shell loop."""
    sync = " conv=fsync" if fsync else ""
    return ["sh", "-c", f'mkdir -p "{dest}" && for f in "{source}"/*; do '
                        f'dd if="$f" of="{dest}/$(basename "$f")" bs=64M status=none{sync} || exit 1; done']


def peer_runs(args, hf: Path, workdir: Path) -> tuple[list[dict], str]:
    """Megatron-Bridge's HF -> Megatron and Megatron -> HF, if `--peer-python` can import it."""
    script = str(ROOT / "bench/peer_megatron_bridge.py")
    env = dict(os.environ)
    if args.peer_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_pythonpath, env.get("PYTHONPATH")) if p)
    try:
        check = subprocess.run([args.peer_python, script, "check"], capture_output=True, text=True, env=env)
    except OSError as e:
        return [], f"peer converter (Megatron-Bridge): {args.peer_python} cannot run: {e}"
    if check.returncode != 0:
        return [], f"peer converter (Megatron-Bridge, {args.peer_python}): " + check.stderr.strip().splitlines()[-1]
    version = check.stdout.strip().splitlines()[-1]
    megatron, back = workdir / "peer-megatron", workdir / "peer-back"
    runs = [
        measure("peer HF -> Megatron", [args.peer_python, script, "import", "--hf", str(hf), "--out", str(megatron)], env,
                megatron, args.repeats),
        measure("peer Megatron -> HF", [args.peer_python, script, "export", "--hf", str(hf), "--megatron", str(megatron),
                                        "--out", str(back)], env, back, args.repeats),
    ]
    return runs, f"peer converter: {version} (AutoBridge, local layer spec, CPU), python {args.peer_python}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wit-bench"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row; the shortest wall time is shown")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter that has megatron-bridge")
    parser.add_argument("--peer-pythonpath", help="prepended to PYTHONPATH for the peer only (its transformers pin)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, megatron, back = (args.workdir / n for n in ("hf", "megatron", "back"))
    sizes = make_checkpoint(hf, args.gb, args.dtype)
    py = sys.executable
    copy = args.workdir / "copy"
    n = args.repeats
    runs = []
    for label, cmd in (("copy (cp -r)", ["cp", "-r", str(hf), str(copy)]),
                       ("copy (dd, user space)", dd_copy(hf, copy, fsync=False)),
                       ("durable copy (dd, fsync)", dd_copy(hf, copy, fsync=True))):
        runs.append(measure(label, cmd, output=copy, repeats=n))
    shutil.rmtree(copy)
    # What each direction imports before touching a byte (megatron-core, whose import pulls in
    # torch._dynamo/_inductor, only HF -> Megatron needs): the fixed cost of a run, any model size.
    imports = {
        "HF -> Megatron": measure("imports of HF -> Megatron", [py, "-c", "import wit_megatron.convert.hf_to_mcore, "
                                  "megatron.core.dist_checkpointing, megatron.core.models.gpt"], repeats=n),
        "Megatron -> HF": measure("imports of Megatron -> HF", [py, "-c", "import wit_megatron.convert.mcore_to_hf"],
                                  repeats=n),
    }
    runs += list(imports.values()) + [
        dict(measure("HF -> Megatron", [py, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out",
                                        str(megatron)], output=megatron, repeats=n),
             fixed_s=imports["HF -> Megatron"]["wall_s"]),
        dict(measure("Megatron -> HF", [py, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron", str(megatron),
                                        "--out", str(back)], output=back, repeats=n),
             fixed_s=imports["Megatron -> HF"]["wall_s"]),
    ]
    cast = "bf16" if args.dtype == "float32" else "fp32"
    runs.append(dict(measure(f"HF -> Megatron --dtype {cast}", [py, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf),
                                                                "--out", str(megatron), "--dtype", cast, "--force"],
                             output=megatron, repeats=n),
                     fixed_s=imports["HF -> Megatron"]["wall_s"], output_bytes=sizes["bytes"] * (0.5 if cast == "bf16" else 2)))
    shutil.rmtree(megatron)
    shutil.rmtree(back)
    peer, peer_line = peer_runs(args, hf, args.workdir)
    runs += peer
    copy_s, durable_s = runs[0]["wall_s"], runs[2]["wall_s"]
    gib = 1024**3
    print(f"model: {sizes['layers']} layers, {sizes['bytes'] / gib:.2f} GiB ({args.dtype}); largest layer "
          f"{sizes['layer_bytes'] / gib:.3f} GiB; python {sys.version.split()[0]}; best of {n} runs")
    print("peak mem: all processes of the run (summed PSS), anon: its anonymous part (the rest is memory-mapped")
    print("file pages: clean, reclaimable page cache of the input); /model: over the model's bytes (for the cast")
    print("row, the larger of input and output); max RSS: GNU time's, of the largest single process")
    print(f"{'run':30} {'wall s':>8} {'/copy':>7} {'/durable':>9} {'-imports /durable':>18} {'peak mem GiB':>13} "
          f"{'/model':>7} {'/layer':>7} {'anon GiB':>9} {'/model':>7} {'max RSS GiB':>12}")
    for r in runs:
        net = f"{(r['wall_s'] - r['fixed_s']) / durable_s:18.2f}" if "fixed_s" in r else f"{'':18}"
        model = max(sizes["bytes"], r.get("output_bytes", 0))
        print(f"{r['label']:30} {r['wall_s']:8.2f} {r['wall_s'] / copy_s:7.2f} {r['wall_s'] / durable_s:9.2f} {net} "
              f"{r['peak_mem'] / gib:13.2f} {r['peak_mem'] / model:7.2f} {r['peak_mem'] / sizes['layer_bytes']:7.1f} "
              f"{r['peak_anon'] / gib:9.2f} {r['peak_anon'] / model:7.2f} {r['peak_rss'] / gib:12.2f}")
    print(peer_line)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
