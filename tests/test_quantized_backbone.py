"""Quantized frozen backbones (`--backbone-dtype int8|int4`, readapt.quantization): the body's linear weights
quantized by transformers' torchao (int8) or bitsandbytes (int4) integration on the CPU, the task head and the
LM head kept float; READ and its feature cache on top.

Tolerances, and why:
- untrained READ vs the quantized backbone: bit for bit. Its up-projections start at zero, so the correction it
  adds is exactly zero, whatever the weights are stored in.
- float32 cache vs live epochs: relative 1e-5 per step, as for a float32 backbone (tests/test_cache.py): the
  cache is built in other batches than the live epochs use, and the CPU kernels are not batch-invariant.
- int8 vs float32 all-MiniLM-L6-v2 on real SST-2 sentences: final hidden states within 5 % relative (Frobenius
  norm over the real tokens; measured 2.7 % on a sample: per-row int8 scales round each weight by up to half a
  step, 0.4 % of the row's largest weight, and six layers add such errors up).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from conftest import REAL_GLUE_DIR, REPO_ROOT, needs_real_glue
from readapt import ReadConfig, get_read_model
from readapt.backbone import describe_backbone
from readapt.cli import main
from readapt.errors import ConfigError, ReadaptError
from readapt.pretrained import load_backbone
from readapt.read.cache.fingerprint import backbone_fingerprint
from readapt.recipe import DataConfig, TrainingConfig, train

WORDS = ("good", "bad", "fine", "awful", "great", "terrible", "movie", "plot", "actor", "boring", "fun")
SMALL = ReadConfig(hidden_size=16)
# fixture name -> what load_backbone builds from it
KINDS = {"bert": "classifier", "llama": "classifier", "t5": "label-words", "llama-lm": "label-words"}


def _load(tiny_models, kind: str, dtype: str = "int8"):
    return load_backbone(str(tiny_models[kind]), 2, dtype=dtype, decoder_head=KINDS[kind])


def _batch(loaded, kind: str) -> dict[str, torch.Tensor]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(4)]
    batch = dict(loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    if kind == "t5":
        labels = loaded.tokenizer(["positive", "negative", "positive", "negative"], padding=True,
                                  return_tensors="pt").input_ids
        batch["labels"] = labels.masked_fill(labels == loaded.tokenizer.pad_token_id, -100)
    elif kind == "llama-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([0, 1, 1, 0])
    return batch


def _in(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", list(KINDS))
def test_int8_quantizes_the_body_and_keeps_task_and_lm_heads_float(kind, tiny_models):
    loaded = _load(tiny_models, kind)
    model = loaded.model
    assert loaded.quantization["dtype"] == "int8" and loaded.quantization["backend"] == "torchao"
    assert loaded.quantization["device_type"] == "cpu"
    assert "int8 weights by torchao" in loaded.source
    info = describe_backbone(model)
    kept = list(info.head_modules)
    if model.get_output_embeddings() is not None:
        kept += [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    assert kept and set(kept) <= set(loaded.quantization["kept_float"])
    for name in kept:
        for param in model.get_submodule(name).parameters():
            assert type(param) is torch.nn.Parameter and param.dtype == torch.float32, name
    layer_linears = [m for stack in info.stacks for m in stack.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert layer_linears and all(is_traceable_wrapper_subclass(m.weight) for m in layer_linears)


def test_unknown_dtype_device_map_and_missing_backend_are_refused(tiny_models, monkeypatch):
    with pytest.raises(ReadaptError, match="backbone dtype 'int3'; allowed: .*int8, int4"):
        load_backbone(str(tiny_models["bert"]), 2, dtype="int3")
    # transformers' torchao integration moves what it quantizes to a GPU: CPU RAM / disk offload cannot work
    with pytest.raises(ReadaptError, match="int8 cannot be combined with a device map that puts weights on cpu"):
        load_backbone(str(tiny_models["bert"]), 2, dtype="int8", device_map="cpu")
    monkeypatch.setattr("readapt.quantization._usable", lambda name, device_type: False)
    with pytest.raises(ReadaptError, match=r"int4 on cpu needs bitsandbytes \(bitsandbytes >= 0.46 .*readapt\[quant\]"):
        load_backbone(str(tiny_models["bert"]), 2, dtype="int4")


# ---------------------------------------------------------------------------------------------- READ on it
def _check_read_on(loaded, kind: str) -> None:
    backbone = loaded.model
    batch = _batch(loaded, kind)
    with torch.no_grad():
        reference = backbone(**batch)
    model = get_read_model(backbone, SMALL)
    with torch.no_grad():
        untrained = model(**batch)
    assert torch.equal(untrained.logits, reference.logits) and torch.equal(untrained.loss, reference.loss)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        for name, param in model.backbone.named_parameters():
            if _in(name, model.head_module_names):
                assert param.requires_grad and param.grad is not None, name
            else:
                assert not param.requires_grad and param.grad is None, name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    model.eval()
    with torch.no_grad():
        trained = model(**batch)
    assert not torch.allclose(trained.logits, reference.logits)  # the side network learned a correction
    with model.disable_adapter(), torch.no_grad():  # and the backbone under it is the one it started from
        assert torch.equal(model(**batch).logits, reference.logits)


@pytest.mark.parametrize("kind", ["bert", "llama", "t5", "llama-lm"])
def test_read_on_int8_backbone_equals_it_untrained_and_trains_without_backbone_gradients(kind, tiny_models):
    _check_read_on(_load(tiny_models, kind), kind)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT / Llama of width 64: bitsandbytes' CPU 4-bit kernels take whole blocks of 64 inputs."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from readapt.pretrained import embedded_backbone_dir

    torch.manual_seed(0)
    vocab = 30522  # the BERT tokenizer's
    models = {
        "bert": BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=128)),
        "llama": LlamaForSequenceClassification(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, pad_token_id=0)),
    }
    tokenizer = AutoTokenizer.from_pretrained(embedded_backbone_dir())
    folders = {}
    for name, model in models.items():
        folders[name] = tmp_path_factory.mktemp(f"wide-{name}")
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_int4_through_bitsandbytes_on_the_cpu(kind, wide_models, tiny_models):
    loaded = _load(wide_models, kind, "int4")
    assert loaded.quantization["backend"] == "bitsandbytes" and "NF4" in loaded.quantization["scheme"]
    layer = describe_backbone(loaded.model).stacks[0].layers[0]
    weights = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert weights and all(w.dtype == torch.uint8 and w.quant_state is not None for w in weights)  # packed
    _check_read_on(loaded, kind)
    with pytest.raises(ReadaptError, match="int4 on cpu: bitsandbytes quantizes each row in blocks of 64 inputs, and "
                                           r"\S+ has 32; use int8"):
        _load(tiny_models, kind, "int4")


# ---------------------------------------------------------------------------------------------- the feature cache
def test_fingerprint_follows_the_quantized_weights_and_is_stable_across_processes(tiny_models, wide_models):
    heads = ["classifier", "bert.pooler"]
    first = backbone_fingerprint(_load(tiny_models, "bert").model, heads)
    again = _load(tiny_models, "bert").model
    assert backbone_fingerprint(again, heads) == first
    assert backbone_fingerprint(_load(tiny_models, "bert", "float32").model, heads) != first
    again.bert.encoder.layer[1].output.dense.weight.scale[0] *= 1.5  # a torchao scale, inside the subclass
    assert backbone_fingerprint(again, heads) != first

    four_bit = _load(wide_models, "bert", "int4").model
    reference = backbone_fingerprint(four_bit, heads)
    four_bit.bert.encoder.layer[1].output.dense.weight.quant_state.absmax[0] *= 1.5  # kept beside the bytes
    assert backbone_fingerprint(four_bit, heads) != reference

    script = (f"from readapt.pretrained import load_backbone\nfrom readapt.read.cache.fingerprint import "
              f"backbone_fingerprint\nprint(backbone_fingerprint(load_backbone({str(tiny_models['bert'])!r}, 2, "
              f"dtype='int8').model, {heads!r}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.strip().splitlines()[-1] == first


def _task(folder: Path) -> DataConfig:
    rng = random.Random(0)
    paths = []
    for name, rows in (("train", 40), ("dev", 16)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
                                            "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(rows)))
        paths.append(str(path))
    return DataConfig(train_file=paths[0], validation_file=paths[1], text_columns=["text"])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cache_on_int8_backbone_replays_the_live_losses(kind, tiny_models, tmp_path, step_losses):
    config = TrainingConfig(data=_task(tmp_path), model=str(tiny_models[kind]), epochs=2, batch_size=8,
                            eval_batch_size=16, max_length=32, progress=False, output_dir=str(tmp_path / "run"),
                            overwrite=True, cache_dir=str(tmp_path / "cache"), cache_dtype="float32",
                            method_options={"hidden_size": 16}, decoder_head="classifier", backbone_dtype="float32",
                            cache_features=True)
    float_metrics = train(config)  # a float32 entry in the same cache folder: the int8 runs must not reuse it
    assert not float_metrics["feature_cache"]["reused"]
    config.backbone_dtype, config.cache_features = "int8", False
    step_losses.clear()
    live_metrics = train(config)
    live = list(step_losses)
    config.cache_features = True
    step_losses.clear()
    metrics = train(config)
    assert len(live) == len(step_losses) == 10  # 2 epochs x 5 shuffled batches
    assert step_losses == pytest.approx(live, rel=1e-5)
    assert [e["dev"] for e in metrics["epochs"]] == [e["dev"] for e in live_metrics["epochs"]]
    assert metrics["backbone_dtype"] == "int8" and "int8 weights by torchao" in metrics["model"]
    assert not metrics["feature_cache"]["reused"]
    assert train(config)["feature_cache"]["reused"]  # the same quantized backbone again: its own entries


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["full", "lora"])
def test_methods_that_need_the_backbones_gradients_are_refused_in_one_line(method, tmp_path, capsys):
    code = main(["train", "--task", "sst2", "--method", method, "--backbone-dtype", "int8", "--output-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--backbone-dtype int8 needs --method read: {method} trains or back-propagates" in err
    assert "quantized weights can neither be trained nor back-propagated through" in err
    with pytest.raises(ConfigError, match="--backbone-dtype int4 needs --method read"):
        TrainingConfig(data=DataConfig(task="sst2"), method=method, backbone_dtype="int4").validate()


def test_cli_device_map_with_int8_is_one_line(tiny_models, tmp_path, capsys):
    data = _task(tmp_path)
    code = main(["train", "--train-file", data.train_file, "--validation-file", data.validation_file,
                 "--text-columns", "text", "--model", str(tiny_models["bert"]), "--backbone-dtype", "int8",
                 "--device-map", "cpu", "--no-cache-features", "--epochs", "1", "--no-progress",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "cannot be combined with a device map" in err, err


# ---------------------------------------------------------------------------------------------- real backbone
@pytest.mark.slow
@needs_real_glue
def test_real_backbone_int8_on_sst2_rows(tmp_path, step_losses):
    """all-MiniLM-L6-v2 on real SST-2 sentences: the int8 body's final hidden states stay within 5 % of float32's,
    and READ trains on it from the feature cache (200 rows, 2 epochs) with the cache replaying live losses."""
    from readapt.tasks.glue import load_glue_split

    texts = [row.texts[0] for row in load_glue_split("sst2", REAL_GLUE_DIR, "validation", max_samples=48)]
    states = {}
    for dtype in ("float32", "int8"):
        loaded = load_backbone(None, 2, dtype=dtype)
        batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model.bert(**batch).last_hidden_state
        states[dtype] = hidden[batch["attention_mask"].bool()]
    error = (states["int8"] - states["float32"]).norm() / states["float32"].norm()
    assert error < 0.05, error

    config = TrainingConfig(data=DataConfig(task="sst2", data_dir=str(REAL_GLUE_DIR), max_train_samples=200,
                                            max_eval_samples=100),
                            epochs=2, batch_size=32, max_length=64, progress=False, output_dir=str(tmp_path / "run"),
                            overwrite=True, cache_dir=str(tmp_path / "cache"), cache_dtype="float32",
                            backbone_dtype="int8", cache_features=False)
    step_losses.clear()
    live = train(config)
    live_losses = list(step_losses)
    config.cache_features = True
    step_losses.clear()
    cached = train(config)
    assert step_losses == pytest.approx(live_losses, rel=1e-5)
    assert cached["best_score"] == live["best_score"]
    assert cached["backbone_dtype"] == "int8" and cached["feature_cache"]["bytes"] > 0


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_an_adapter_on_an_int8_backbone_records_int8_and_loads_on_int8_again(kind, tiny_models, tmp_path):
    """adapter_config.json's backbone_dtype is the storage dtype ("int8"), not the float32 that the quantized weights
    report as their dtype, so AutoReadModel.from_pretrained(adapter) loads the backbone quantized again."""
    from readapt.quantization import quantized_dtype
    from readapt.read.auto import AutoReadModel

    loaded = _load(tiny_models, kind)
    model = get_read_model(loaded.model, SMALL)
    assert model.backbone_dtype == torch.float32  # what the weights report: the dtype they compute in
    model.save_pretrained(tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "adapter_config.json").read_text())["backbone_dtype"] == "int8"
    again = AutoReadModel.from_pretrained(tmp_path / "int8")
    assert quantized_dtype(again.backbone) == "int8"
    batch = _batch(loaded, kind)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    float_model = get_read_model(_load(tiny_models, kind, "float32").model, SMALL)
    float_model.save_pretrained(tmp_path / "float32")
    assert json.loads((tmp_path / "float32" / "adapter_config.json").read_text())["backbone_dtype"] == "float32"


def test_eval_and_predict_load_an_int8_adapters_backbone_in_int8(tiny_models, tmp_path, monkeypatch):
    """`readapt eval` / `readapt predict` score the model that was trained: an adapter trained on an int8 backbone
    is scored on the int8 backbone (the dtype its adapter_config.json records), not on float32 weights."""
    from readapt.inference import Predictor
    from readapt.quantization import quantized_dtype
    from readapt.recipe.evaluation import evaluate_adapter

    data = _task(tmp_path)
    config = TrainingConfig(data=data, model=str(tiny_models["bert"]), epochs=2, batch_size=8, eval_batch_size=16,
                            max_length=32, progress=False, output_dir=str(tmp_path / "run"), overwrite=True,
                            method_options={"hidden_size": 16}, backbone_dtype="int8")
    metrics = train(config)
    adapter = tmp_path / "run" / "adapter"
    scored = evaluate_adapter(data, str(tiny_models["bert"]), adapter, max_length=32, progress=False, cpu=True)
    assert scored == metrics["best_dev"]
    import readapt.recipe.evaluation as evaluation

    asked = []
    real = evaluation.load_backbone
    monkeypatch.setattr(evaluation, "load_backbone", lambda *a, **k: asked.append(k["dtype"]) or real(*a, **k))
    evaluate_adapter(data, str(tiny_models["bert"]), adapter, max_length=32, progress=False, cpu=True,
                     dtype="float32")
    assert asked == ["float32"]  # an explicit dtype wins over the recorded one
    predictor = Predictor([adapter], model=str(tiny_models["bert"]), cpu=True)
    assert quantized_dtype(predictor.model.backbone) == "int8"
