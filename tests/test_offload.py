"""Frozen backbones bigger than one device (readapt.offload): a backbone placed by Accelerate's big-model
loading, with part of it offloaded to disk, trains READ exactly as the fully loaded backbone does.

Only a CPU is here, so offloading means CPU RAM + disk (weights on the meta device, loaded by Accelerate's
hooks as each module runs); multi-GPU placement is checked at the planning level (which device every entry
and the task head get), not run.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import compute_module_sizes

from conftest import _save_tiny, make_batch, tiny_backbone
from readapt import ReadConfig, get_read_model
from readapt.cli import main
from readapt.errors import ConfigError
from readapt.offload import (
    empty_model,
    execution_device_in_map,
    normalize_max_memory,
    offloaded_parameters,
    parse_device_map,
    plan_device_map,
)
from readapt.pretrained import load_backbone
from readapt.read.cache import backbone_fingerprint

KINDS = {"bert": 3, "t5": 2, "llama-cls": 2}  # family -> num_labels
STEPS = 4
# Offloading changes where weights wait, not what is computed: on this CPU the losses came out bit-identical.
# The assertion allows float32 round-off in case a kernel picks another path.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("offload-models")
    return {kind: _save_tiny(tiny_backbone(kind, num_layers=4), root / kind) for kind in KINDS}


def _load(path, kind, offload_dir=None):
    """The backbone fully loaded, or (offload_dir given) with CPU RAM for about half of it and the rest on disk."""
    if offload_dir is None:
        return load_backbone(str(path), KINDS[kind], decoder_head="classifier").model
    size = compute_module_sizes(load_backbone(str(path), KINDS[kind], decoder_head="classifier").model)[""]
    return load_backbone(str(path), KINDS[kind], device_map="auto", max_memory={"cpu": size // 2},
                         offload_folder=str(offload_dir), decoder_head="classifier").model


def _train(model, kind, steps=STEPS):
    """READ on `model`, a few AdamW steps on a fixed batch; returns (read model, losses, what got gradients)."""
    torch.manual_seed(0)
    read = get_read_model(model, ReadConfig(hidden_size=16))
    optimizer = torch.optim.AdamW([p for p in read.parameters() if p.requires_grad], lr=0.05)
    batch = make_batch(kind)
    read.train()
    torch.manual_seed(1)
    losses, with_grad = [], set()
    for _ in range(steps):
        loss = read(**batch, use_cache=False).loss
        loss.backward()
        with_grad |= {name for name, p in read.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return read, losses, with_grad


@pytest.mark.parametrize("kind", list(KINDS))
def test_offloaded_backbone_trains_like_loaded_backbone(kind, saved, tmp_path):
    full = _load(saved[kind], kind)
    offloaded = _load(saved[kind], kind, tmp_path / "offload")

    # part of the backbone really is on disk: its weights are meta placeholders, some of them a stack's layers
    assert "disk" in offloaded.hf_device_map.values(), offloaded.hf_device_map
    meta = offloaded_parameters(offloaded)
    assert meta and len(meta) < sum(1 for _ in offloaded.parameters())
    assert any(".0." not in n and (".layer." in n or ".block." in n or ".layers." in n) for n in meta)

    _, full_losses, _ = _train(full, kind)
    read, losses, with_grad = _train(offloaded, kind)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses), **TOLERANCE)
    assert losses[-1] < losses[0]

    # gradients reached READ's side networks and the task head, never a backbone weight
    head = tuple(f"backbone.{h}." for h in read.head_module_names)
    assert any(n.startswith("read.") for n in with_grad)
    assert all(n.startswith(("read.", *head)) for n in with_grad), sorted(with_grad)
    for name, p in offloaded.named_parameters():
        if not any(name.startswith(h) for h in (f"{x}." for x in read.head_module_names)):
            assert not p.requires_grad and p.grad is None, name
    # the offloaded weights are still offloaded after training (loaded per module run, then dropped)
    assert offloaded_parameters(offloaded) == meta
    # side networks (and head) live on the device of the final hidden state, here the CPU
    assert {p.device.type for p in read.read.parameters()} == {"cpu"}


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_untrained_read_on_offloaded_backbone_equals_backbone_and_unload_keeps_dispatch(kind, saved, tmp_path):
    offloaded = _load(saved[kind], kind, tmp_path / "offload")
    batch = make_batch(kind)
    with torch.no_grad():
        bare = offloaded(**batch, use_cache=False).logits
        read = get_read_model(offloaded, ReadConfig(hidden_size=16))
        read.eval()
        assert torch.equal(read(**batch, use_cache=False).logits, bare)  # zero up-projection: exactly the backbone
        backbone = read.unload()
        assert torch.equal(backbone(**batch, use_cache=False).logits, bare)  # Accelerate's hooks are back in place
    assert offloaded_parameters(backbone)


def test_feature_cache_fingerprint_reads_offloaded_weights(saved, tmp_path):
    full, offloaded = _load(saved["t5"], "t5"), _load(saved["t5"], "t5", tmp_path / "offload")
    assert offloaded_parameters(offloaded)
    assert backbone_fingerprint(offloaded) == backbone_fingerprint(full)  # one cache serves both


# ---------------------------------------------------------------------------------------------- planning
def test_task_head_is_never_offloaded(saved):
    for kind in ("bert", "llama-cls"):
        config = load_backbone(str(saved[kind]), KINDS[kind]).model.config
        from transformers import AutoModelForSequenceClassification

        skeleton = empty_model(AutoModelForSequenceClassification, config)
        planned = plan_device_map(skeleton, "cpu", {"cpu": 1}, torch.float32)  # nothing fits: all on disk
        heads = ["classifier", "bert.pooler"] if kind == "bert" else ["score"]
        assert {planned[h] for h in heads} == {"cpu"}, planned
        assert "disk" in planned.values()


def test_multi_gpu_map_pins_head_to_the_final_hidden_states_device(saved):
    """A two-GPU map (planning only; no GPU needed): the head goes where the last layer runs, and entries on
    cpu/disk run on the main (first) GPU."""
    from transformers import AutoModelForSequenceClassification

    config = load_backbone(str(saved["bert"]), 3).model.config
    skeleton = empty_model(AutoModelForSequenceClassification, config)
    given = {"bert.embeddings": 0, "bert.encoder.layer.0": 0, "bert.encoder.layer.1": 0, "bert.encoder.layer.2": 1,
             "bert.encoder.layer.3": 1, "bert.pooler": "disk", "dropout": 0, "classifier": "cpu"}
    planned = plan_device_map(skeleton, parse_device_map(json.dumps(given)), None, torch.float32)
    assert planned["classifier"] == 1 and planned["bert.pooler"] == 1
    assert planned["bert.encoder.layer.0"] == 0
    assert execution_device_in_map({"a": 0, "b": "disk", "c": 1}, "b.x") == 0
    assert execution_device_in_map({"": "disk", "h": "cpu"}, "x") == "cpu"

    # a head inside a wider entry: the entry is split so that only the head moves
    planned = plan_device_map(skeleton, {"bert": 0, "dropout": 0, "classifier": 0}, None, torch.float32)
    assert planned["classifier"] == 0 and planned["bert.pooler"] == 0 and planned["bert.encoder"] == 0
    planned = plan_device_map(skeleton, {"": 1}, None, torch.float32)
    assert planned["classifier"] == 1 and "" not in planned and planned["bert.encoder"] == 1


def test_parsing_errors_are_config_errors():
    assert normalize_max_memory("0=20GiB, cpu=1GB,cuda:1=10MB") == {0: 20 * 2**30, "cpu": 10**9, 1: 10**7}
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"} and parse_device_map("auto") == "auto"
    for bad in ("cpu", "gpu=1GiB", "cpu=lots", "=1GiB"):
        with pytest.raises(ConfigError):
            normalize_max_memory(bad)
    for bad in ("everywhere", "[1, 2]", '{"": -1}'):
        with pytest.raises(ConfigError):
            parse_device_map(bad)


# ---------------------------------------------------------------------------------------------- command line
FEW = ["--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8", "--epochs", "1",
       "--max-length", "32", "--no-progress"]


@pytest.fixture()
def task_files(tmp_path):
    rows = [{"text": f"sample number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--train-file", str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "dev.jsonl"),
            "--text-columns", "text"]


@pytest.mark.parametrize("kind,placement", [("bert", ["--device-map", "auto", "--max-memory", "cpu=2MB"]),
                                            ("t5", ["--device-map", "cpu", "--max-memory", "cpu=0"])])
def test_cli_train_with_offloaded_backbone(kind, placement, tiny_models, task_files, tmp_path, capsys):
    runs = {}
    # both live: the feature cache (on by default without --device-map) would round the loaded run's states
    for name, extra in (("loaded", ["--no-cache-features"]),
                        ("offloaded", [*placement, "--offload-folder", str(tmp_path / "offload")])):
        out = tmp_path / name
        code = main(["train", "--model", str(tiny_models[kind]), "--output-dir", str(out), *FEW, *task_files, *extra])
        assert code == 0, capsys.readouterr().err
        runs[name] = json.loads((out / "metrics.json").read_text())
    placed = runs["offloaded"]["backbone_device_map"]
    assert "disk" in placed.values() and runs["loaded"]["backbone_device_map"] is None
    assert "backbone placement" in capsys.readouterr().out
    losses = [[e["train_loss"] for e in runs[n]["epochs"]] for n in ("loaded", "offloaded")]
    assert losses[1] == pytest.approx(losses[0], **{"rel": 1e-6, "abs": 1e-6})
    assert runs["offloaded"]["best_dev"] == runs["loaded"]["best_dev"]


@pytest.mark.parametrize("arguments,expected", [
    (["--method", "lora", "--device-map", "auto"], "--device-map needs --method read: lora back-propagates"),
    (["--method", "full", "--device-map", "cpu"], "--device-map needs --method read: full"),
    (["--max-memory", "cpu=1GiB"], "--max-memory need(s) --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "--max-memory 'cpu:1GiB': expected DEVICE=SIZE"),
    (["--device-map", "everywhere"], "--device-map 'everywhere': expected auto, cpu, or a JSON object"),
])
def test_cli_placement_errors_are_one_line(arguments, expected, tiny_models, task_files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_models["bert"]), "--output-dir", str(out), *FEW, *task_files, *arguments])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
