"""ReadConfig validation, unsupported backbones, save_pretrained / from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

from conftest import FAMILIES, make_batch, tiny_backbone, train_steps
from readapt import (
    ConfigError,
    IncompatibleAdapterError,
    ReadConfig,
    ReadModel,
    UnsupportedModelError,
    get_read_model,
)
from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rnn_type", "transformer", "rnn_type='transformer' is invalid; allowed values: gru, lstm, rnn"),
        ("aggregation", "max", "allowed values: mean, last"),
        ("h0", "random", "allowed values: zeros, embeddings"),
        ("hidden_size", 0, "hidden_size=0 is invalid; it must be an integer >= 1"),
        ("hidden_size", 12.5, "hidden_size=12.5"),
        ("num_rnn_layers", -1, "num_rnn_layers=-1"),
        ("dropout", 1.0, "dropout=1.0 is invalid; it must be a number in [0, 1)"),
        ("scaling", float("nan"), "scaling=nan is invalid"),
        ("stacks", ["middle"], "stacks='middle' is invalid; allowed values: encoder, decoder"),
        ("couple_encoder", "yes", "couple_encoder='yes' is invalid; allowed values: true, false"),
    ],
)
def test_invalid_config_names_field_and_allowed_values(field, value, expected):
    with pytest.raises(ConfigError, match=None) as info:
        ReadConfig(**{field: value})
    assert f"ReadConfig.{field}" in str(info.value)
    assert expected in str(info.value)


def test_config_json_round_trip_and_unknown_fields():
    config = ReadConfig(hidden_size=64, rnn_type="lstm", stacks=["decoder"], dropout=0.1)
    assert ReadConfig.from_dict(json.loads(config.to_json_string())) == config
    with pytest.raises(ConfigError, match="unknown ReadConfig field"):
        ReadConfig.from_dict({"hidden_size": 8, "rank": 4})


def test_stack_selection_errors():
    with pytest.raises(ConfigError, match="only: encoder"):
        get_read_model(tiny_backbone("bert"), ReadConfig(stacks=["decoder"]))
    with pytest.raises(ConfigError, match="needs couple_encoder=True"):
        get_read_model(tiny_backbone("t5"), ReadConfig(stacks=["encoder"]))
    with pytest.raises(ConfigError, match="head_modules names 'lm_head_x'"):
        get_read_model(tiny_backbone("gpt2"), ReadConfig(head_modules=["lm_head_x"]))


def test_decoder_only_and_coupled_encoder_only_variants_train():
    for config in (ReadConfig(hidden_size=8, stacks=["decoder"]),
                   ReadConfig(hidden_size=8, stacks=["encoder"], couple_encoder=True),
                   ReadConfig(hidden_size=8, encoder_context=False)):
        model = get_read_model(tiny_backbone("t5"), config)
        losses = train_steps(model, make_batch("t5"), steps=6)
        assert losses[-1] < losses[0], config


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   image_size=32, patch_size=8)),
        lambda: CLIPModel(CLIPConfig(
            text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
            vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                           "image_size": 32, "patch_size": 8})),
        lambda: torch.nn.Linear(4, 4),
    ],
    ids=["vit", "clip", "plain-module"],
)
def test_unsupported_models_fail_clearly(backbone):
    with pytest.raises(UnsupportedModelError) as info:
        get_read_model(backbone())
    message = str(info.value)
    assert message.startswith("unsupported model")
    assert "encoder-decoder (T5" in message and "encoder-only" in message and "decoder-only" in message


@pytest.mark.parametrize("kind", [*FAMILIES, "llama-cls"])
def test_save_then_load_gives_identical_outputs(kind, tmp_path):
    batch = make_batch(kind)
    model = get_read_model(tiny_backbone(kind), ReadConfig(hidden_size=16, h0="embeddings"))
    train_steps(model, batch, steps=4)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    loaded = ReadModel.from_pretrained(tiny_backbone(kind), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    trainable = ReadModel.from_pretrained(tiny_backbone(kind), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_t5_base_size_adapter_is_under_10_mb(tmp_path):
    # The adapter does not depend on depth (invariant 3), so two layers of T5-base width stand in for twelve.
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=2, num_heads=12)
    model = get_read_model(T5ForConditionalGeneration(config), ReadConfig(hidden_size=256))
    model.save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert size < 10 * 1000 * 1000, size
    assert model.get_nb_trainable_parameters()[0] * 4 < size  # every trainable weight is in the file


def test_loading_into_another_architecture_or_width_names_both(tmp_path):
    get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=8)).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleAdapterError) as info:
        ReadModel.from_pretrained(tiny_backbone("bart"), tmp_path)
    assert "trained on T5ForConditionalGeneration (t5," in str(info.value)
    assert "the backbone is BartForConditionalGeneration (bart," in str(info.value)
    with pytest.raises(IncompatibleAdapterError) as info:
        ReadModel.from_pretrained(tiny_backbone("t5", width=48), tmp_path)
    assert "width 32" in str(info.value) and "width 48" in str(info.value)


def test_damaged_or_foreign_adapter_directories(tmp_path):
    model = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=8))
    model.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(IncompatibleAdapterError, match="cannot read weights file"):
        ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(IncompatibleAdapterError, match="not valid JSON"):
        ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path)
    with pytest.raises(IncompatibleAdapterError, match="does not exist"):
        ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "nowhere")


def test_head_of_another_size_is_refused(tmp_path):
    get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=8)).save_pretrained(tmp_path)
    other = tiny_backbone("bert")
    other.classifier = torch.nn.Linear(32, 5)
    with pytest.raises(IncompatibleAdapterError, match=r"head\.classifier\.(weight|bias) has shape \(3"):
        ReadModel.from_pretrained(other, tmp_path)


def test_hidden_size_auto_follows_the_backbone_width(tmp_path):
    """hidden_size=None: the width / 6 rounded up to a multiple of 32, within [64, 512]; the saved adapter holds
    the number, so loading it builds the same side network whatever the default becomes."""
    from readapt.read.config import auto_hidden_size

    widths = (32, 384, 512, 576, 768, 1024, 4096)
    assert [auto_hidden_size(d) for d in widths] == [64, 64, 96, 96, 128, 192, 512]
    assert ReadConfig().hidden_size is None
    assert ReadConfig().resolved_for("encoder-decoder", width=768).hidden_size == 128
    assert ReadConfig(hidden_size=16).resolved_for("encoder-only", width=768).hidden_size == 16
    model = get_read_model(tiny_backbone("bert"), ReadConfig())
    assert model.read_config.hidden_size == 64 and model.read["encoder"].rnn.hidden_size == 64
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["config"]["hidden_size"] == 64


def test_hidden_size_auto_grows_with_the_training_rows(tmp_path):
    """Capacity that grows with data: above AUTO_LARGE_DATA_ROWS training rows auto r is the width / 1.5; an explicit
    hidden_size wins; the saved adapter holds the number, so loading never needs the rows."""
    from readapt.read.config import AUTO_LARGE_DATA_ROWS, auto_hidden_size

    large = AUTO_LARGE_DATA_ROWS + 1
    assert auto_hidden_size(384, AUTO_LARGE_DATA_ROWS) == auto_hidden_size(384) == 64
    assert [auto_hidden_size(d, large) for d in (32, 384, 768, 4096)] == [64, 256, 512, 512]
    assert ReadConfig(train_rows=large).resolved_for("encoder-only", width=384).hidden_size == 256
    assert ReadConfig(hidden_size=16, train_rows=large).resolved_for("encoder-only", width=384).hidden_size == 16
    model = get_read_model(tiny_backbone("bert"), ReadConfig(train_rows=large))
    assert model.read_config.hidden_size == model.read["encoder"].rnn.hidden_size == 64  # 32 wide: the floor
    with pytest.raises(ConfigError, match="train_rows=0 is invalid"):
        ReadConfig(train_rows=0)


def test_readapt_train_sizes_reads_auto_settings_for_the_rows_it_trains_on(tiny_models, tmp_path, monkeypatch):
    """The method tells the recipe which options the data size sets (READ: train_rows, the rows left after the
    selection split); the adapter records them; a user's own option wins."""
    from readapt.methods import get_method
    from readapt.read import config as read_config
    from readapt.recipe import DataConfig, TrainingConfig, train

    assert get_method("full").default_options(123) == {}
    for name, rows in (("train", 20), ("dev", 4)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": "good plot" if i % 2 else "bad movie", "label": i % 2}) + "\n"
                         for i in range(rows))
    monkeypatch.setattr(read_config, "AUTO_LARGE_DATA_ROWS", 10)  # 16 rows count as large here
    monkeypatch.setattr(read_config, "AUTO_HIDDEN_DIVISOR_LARGE", 0.25)  # the 32-wide tiny BERT: r = 128
    for options, rows, width in (({}, 16, 128), ({"train_rows": 5}, 5, 64)):
        out = tmp_path / f"run-{rows}"
        train(TrainingConfig(
            data=DataConfig(train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "dev.jsonl"),
                            text_columns=["text"], selection_fraction=0.2),
            model=str(tiny_models["bert"]), epochs=1, batch_size=8, max_length=8, progress=False,
            output_dir=str(out), method_options=options))
        saved = json.loads((out / "adapter" / CONFIG_NAME).read_text())["config"]
        assert (saved["train_rows"], saved["hidden_size"]) == (rows, width)
