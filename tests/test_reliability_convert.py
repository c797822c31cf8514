"""The conversion tools on bad input and untrusted checkpoints (docs/reliability.md): every case exits
non-zero with a message naming the file, tensor or option and what is wrong, and leaves the file system
exactly as it was (nothing deleted, nothing added, a planted payload never run).

The cases run in this process through the tools' own main functions: each is refused before the tool
starts megatron-core (the checks come first), so no case needs a process of its own.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.reliability import AS_BEFORE, Case, check
from wit_megatron.convert import cli

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests/data/convert/tiny-llama-hf"
CHECKPOINT = ROOT / "tests/data/convert/tiny-llama-mcore-0.16.1"  # HF, converted
PAYLOAD_RAN = "PWNED"  # the file a planted payload creates in the test's directory


class Payload:
    """Pickles into a call of os.system: what a malicious checkpoint plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def plant_in_metadata(ckpt: Path, marker: Path) -> None:
    """.metadata, which torch DCP unpickles with plain pickle.load, with a payload in one of its fields."""
    path = ckpt / "release/.metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.storage_meta = Payload(marker)
    path.write_bytes(pickle.dumps(metadata))


def plant_in_object(ckpt: Path, marker: Path) -> None:
    """A torch.save'd payload as a stored object of a .distcp file (DCP loads those with
    torch.load(weights_only=False)); the metadata points the first object at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = ckpt / "release/.metadata"
    metadata = pickle.loads(path.read_bytes())
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    file = ckpt / "release" / info.relative_path
    offset = file.stat().st_size
    with open(file, "ab") as f:
        f.write(buffer.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
    path.write_bytes(pickle.dumps(metadata))


def plant_in_common(ckpt: Path, marker: Path) -> None:
    torch.save({"args": Payload(marker)}, ckpt / "release/common.pt")


def written_elsewhere(ckpt: Path, drop: tuple[str, ...]) -> None:
    """The checkpoint as another tool's save: no record of ours, Megatron-LM args without `drop`."""
    (ckpt / "wit_megatron.json").unlink()
    common = torch.load(ckpt / "release/common.pt", weights_only=False)
    for name in drop:
        delattr(common["args"], name)
    torch.save({"args": common["args"], "iteration": 0}, ckpt / "release/common.pt")


def other_model_config(ckpt: Path) -> None:
    """A config.json of another model (8 heads instead of 4) in {ws}/other."""
    config = json.loads((HF / "config.json").read_text())
    (ckpt.parent / "other").mkdir()
    (ckpt.parent / "other/config.json").write_text(json.dumps(dict(config, num_attention_heads=8)))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


H2M, M2H, VERIFY = "wit-convert-hf-to-megatron", "wit-convert-megatron-to-hf", "wit-verify-conversion"
TOOLS = {H2M: cli.hf_to_megatron, M2H: cli.megatron_to_hf, VERIFY: cli.verify}
NOT_VALID = "{ckpt}/release/{file}: not a valid checkpoint: "
RAN = "refers to posix.system, which no checkpoint holds (refused without running it)"

# name -> (case, preparation of the test's directory: files to create or break)
TABLE = {
    "h2m_out_is_input": (Case(H2M, "--out is the --hf directory, with --force", ("--hf", "{hf}", "--out", "{hf}", "--force"), 2,
                              "--out {hf} is the input {hf}: writing it would destroy the input"), None),
    "h2m_out_contains_input": (Case(H2M, "--out is a parent of --hf, with --force", ("--hf", "{hf}", "--out", "{ws}", "--force"),
                                    2, "--out {ws} contains the input {hf}: replacing it would delete the input"), None),
    "h2m_out_inside_input": (Case(H2M, "--out inside the --hf directory", ("--hf", "{hf}", "--out", "{hf}/megatron"), 2,
                                  "--out {hf}/megatron lies inside the input {hf}: write it elsewhere"), None),
    "h2m_force_foreign": (Case(H2M, "--force over a directory this tool did not write", ("--hf", "{hf}", "--out", "{mydata}",
                                                                                        "--force"), 2,
                               "--force replaces only a Megatron checkpoint this tool wrote; {mydata} is not one (it holds "
                               "precious.txt): choose another --out, or remove it yourself"), "mydata"),
    "h2m_exists": (Case(H2M, "--out exists, no --force", ("--hf", "{hf}", "--out", "{ckpt}"), 2,
                        "output directory {ckpt} exists; pass --force to replace it"), None),
    "h2m_vocab_multiple": (Case(H2M, "--vocab-multiple -7 (padded the vocabulary silently)", ("--hf", "{hf}", "--out", "{ws}/new",
                                                                                             "--vocab-multiple", "-7"), 2,
                                "argument --vocab-multiple: must be >= 1, got -7"), None),
    "h2m_kv_replicas": (Case(H2M, "--kv-replicas 0", ("--hf", "{hf}", "--out", "{ws}/new", "--kv-replicas", "0"), 2,
                             "argument --kv-replicas: must be >= 1, got 0"), None),
    "h2m_staging_input": (Case(H2M, "--hf is the staging directory a killed export left", ("--hf", "{staging}", "--out",
                                                                                          "{ws}/new"), 2,
                               "{staging}: not a complete Hugging Face model: .hf.wit-staging-0a1b2c3d-4242-1700000000-x "
                               "is the hidden staging directory of a write that has not finished (or was interrupted)"),
                          "staging"),
    "h2m_pickled_weights": (Case(H2M, "an HF model whose weights are a pickle (pytorch_model.bin with a payload)",
                                 ("--hf", "{hf}", "--out", "{ws}/new"), 2,
                                 "{hf}: no safetensors weights (found: config.json, generation_config.json, "
                                 "pytorch_model.bin)", AS_BEFORE + "; the payload did not run"), "pickled_weights"),
    "h2m_no_config": (Case(H2M, "--hf without config.json", ("--hf", "{ws}", "--out", "{ws}/new"), 2,
                           "{ws}: no config.json (is this a Hugging Face model directory?)"), None),

    "m2h_out_is_input": (Case(M2H, "--out is the --megatron checkpoint, with --force", ("--megatron", "{ckpt}", "--out", "{ckpt}",
                                                                                       "--force"), 2,
                              "--out {ckpt} is the input {ckpt}: writing it would destroy the input"), None),
    "m2h_out_inside_input": (Case(M2H, "--out inside the checkpoint", ("--megatron", "{ckpt}", "--out", "{ckpt}/hf"), 2,
                                  "--out {ckpt}/hf lies inside the input {ckpt}: write it elsewhere"), None),
    "m2h_force_foreign_hf": (Case(M2H, "--force over an HF model this tool did not export", ("--megatron", "{ckpt}", "--out",
                                                                                           "{hf}", "--force"), 2,
                                  "--force replaces only a Hugging Face model this tool wrote; {hf} is not one (it holds "
                                  "config.json, generation_config.json, model.safetensors)"), None),
    "m2h_payload_metadata": (Case(M2H, "a payload planted in .metadata (torch DCP unpickles it with pickle.load)",
                                  ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                  NOT_VALID.replace("{file}", ".metadata") + "it " + RAN, AS_BEFORE + "; the payload did not run"),
                             plant_in_metadata),
    "m2h_payload_object": (Case(M2H, "a payload planted as an object in a .distcp file (loaded with weights_only=False)",
                                ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                NOT_VALID.replace("{file}", "__0_0.distcp") + "its object "
                                "decoder.layers.self_attention.linear_proj._extra_state/shard_0_4 " + RAN,
                                AS_BEFORE + "; the payload did not run"), plant_in_object),
    "m2h_payload_common": (Case(M2H, "a payload planted in common.pt", ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                NOT_VALID.replace("{file}", "common.pt") + "it " + RAN, AS_BEFORE + "; the payload did not run"),
                           plant_in_common),
    "m2h_metadata_garbage": (Case(M2H, ".metadata that is not a pickle", ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                  NOT_VALID.replace("{file}", ".metadata") + "it is not a readable pickle"),
                             lambda ckpt, marker: (ckpt / "release/.metadata").write_bytes(b"<html>404</html>")),
    "m2h_truncated_distcp": (Case(M2H, "a truncated .distcp file", ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                  "{ckpt}/release/__0_1.distcp is truncated: it holds 40000 bytes, tensor "
                                  "decoder.layers.mlp.linear_fc2.weight is stored at bytes 32303..40024"),
                             lambda ckpt, marker: truncate(ckpt / "release/__0_1.distcp", 40000)),
    "m2h_missing_distcp": (Case(M2H, "a missing .distcp file", ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                "{ckpt}/release/__0_2.distcp is missing: it holds object "
                                "decoder.layers.mlp.linear_fc1._extra_state/shard_0_4 (and possibly more) of this checkpoint"),
                           lambda ckpt, marker: (ckpt / "release/__0_2.distcp").unlink()),
    "m2h_no_tracker": (Case(M2H, "a checkpoint whose conversion was interrupted (record, no tracker file)",
                            ("--megatron", "{ckpt}/release", "--out", "{ws}/new"), 2,
                            "{ckpt} holds wit_megatron.json but no latest_checkpointed_iteration.txt, which is written last: "
                            "an interrupted conversion or first save, not a complete checkpoint"),
                       lambda ckpt, marker: (ckpt / "latest_checkpointed_iteration.txt").unlink()),
    "m2h_staging_input": (Case(M2H, "--megatron inside the staging directory a killed conversion left",
                               ("--megatron", "{staging}/release", "--out", "{ws}/new"), 2,
                               "not a complete checkpoint: .hf.wit-staging-0a1b2c3d-4242-1700000000-x is the hidden staging "
                               "directory of a write that has not finished (or was interrupted)"), "staging"),
    "m2h_foreign_incomplete": (Case(M2H, "a checkpoint written elsewhere whose Megatron-LM args lack the norm and activation",
                                    ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                    "{ckpt}/release: the Megatron-LM args in its common state does not say normalization, "
                                    "swiglu; give --hf-config DIR"),
                               lambda ckpt, marker: written_elsewhere(ckpt, ("normalization", "swiglu"))),
    "m2h_foreign_nothing": (Case(M2H, "a checkpoint written elsewhere with no args, run config or record",
                                 ("--megatron", "{ckpt}", "--out", "{ws}/new"), 2,
                                 "{ckpt}/release: no wit_megatron record, no Megatron-LM args in its common state and no "
                                 "run_config.yaml: nothing says which model it holds; give --hf-config DIR"),
                            lambda ckpt, marker: ((ckpt / "wit_megatron.json").unlink(),
                                                  torch.save({"iteration": 0}, ckpt / "release/common.pt"))),
    "m2h_template_other_model": (Case(M2H, "--hf-config of another model", ("--megatron", "{ckpt}", "--out", "{ws}/new",
                                                                          "--hf-config", "{ws}/other"), 2,
                                      "--hf-config {ws}/other/config.json does not describe the checkpoint {ckpt}/release: "
                                      "num_attention_heads: checkpoint 4, template 8"),
                                 lambda ckpt, marker: other_model_config(ckpt)),
    "m2h_template_missing": (Case(M2H, "--hf-config that does not exist", ("--megatron", "{ckpt}", "--out", "{ws}/new",
                                                                          "--hf-config", "{ws}/nowhere"), 2,
                                  "--hf-config {ws}/nowhere: no such file"), None),
    "m2h_shard_size": (Case(M2H, "--max-shard-size-gb 0", ("--megatron", "{ckpt}", "--out", "{ws}/new", "--max-shard-size-gb",
                                                           "0"), 2, "argument --max-shard-size-gb: must be finite and > 0.0, got 0"),
                       None),

    "verify_payload": (Case(VERIFY, "a payload planted in .metadata", ("--hf", "{hf}", "--megatron", "{ckpt}"), 2,
                            NOT_VALID.replace("{file}", ".metadata") + "it " + RAN, AS_BEFORE + "; the payload did not run"),
                       plant_in_metadata),
    "verify_tp": (Case(VERIFY, "--tp 0", ("--hf", "{hf}", "--megatron", "{ckpt}", "--tp", "0"), 2,
                       "argument --tp: must be >= 1, got 0"), None),
    "verify_tolerance": (Case(VERIFY, "--tolerance nan", ("--hf", "{hf}", "--megatron", "{ckpt}", "--tolerance", "nan"), 2,
                              "argument --tolerance: must be finite and >= 0.0, got nan"), None),
    "verify_staging_hf": (Case(VERIFY, "--hf is the staging directory a killed export left", ("--hf", "{staging}", "--megatron",
                                                                                             "{ckpt}"), 2,
                               "{staging}: not a complete Hugging Face model"), "staging"),
}
CASES = {name: case for name, (case, _) in TABLE.items()}


@pytest.mark.parametrize("name", list(TABLE))
def test_refused_with_a_message_and_nothing_changed(tmp_path, name):
    case, prepare = TABLE[name]
    paths = {"ws": tmp_path, "hf": tmp_path / "hf", "ckpt": tmp_path / "ckpt", "mydata": tmp_path / "mydata",
             "staging": tmp_path / ".hf.wit-staging-0a1b2c3d-4242-1700000000-x"}
    shutil.copytree(HF, paths["hf"])
    shutil.copytree(CHECKPOINT, paths["ckpt"])
    marker = tmp_path / PAYLOAD_RAN
    if prepare == "mydata":
        paths["mydata"].mkdir()
        (paths["mydata"] / "precious.txt").write_text("a user's file")
    elif prepare == "staging":  # what a killed run leaves: a complete-looking model and checkpoint, a cut tokenizer
        shutil.copytree(HF, paths["staging"])
        shutil.copytree(CHECKPOINT / "release", paths["staging"] / "release")
        (paths["staging"] / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    elif prepare == "pickled_weights":  # weights as torch.save writes them: only safetensors are read
        (paths["hf"] / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": Payload(marker)}, paths["hf"] / "pytorch_model.bin")
    elif prepare is not None:
        prepare(paths["ckpt"], marker)
    check(case, paths, tmp_path, TOOLS[case.tool])
    assert not marker.exists()
