"""READ under torch.compile: `TrainingArguments(torch_compile=True)` (Trainer compiles the ReadModel with the default
inductor backend, on CPU here) trains as the eager model does, and what it saves is the adapter alone, which reloads
to identical logits; a compiled model's state dict (its keys carry torch.compile's `_orig_mod.` prefix) saves the same
adapter; `model.compile()` (in place) trains with Trainer as the model itself; a compiled *backbone* is refused
(READ hooks its layers and trains its head by name, which the wrapper hides). Compiling takes 30 s to two minutes on
a shared 2-core CPU, hence `slow`; the other tests compile nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, tiny_backbone, train_steps
from readapt import ConfigError, ReadConfig, ReadModel, get_read_model
from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from test_hf_trainer import _tiny_trainer


def _saved_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.slow
def test_trainer_torch_compile_trains_like_eager_saves_the_adapter_and_reloads(tmp_path):
    from torch._dynamo.eval_frame import OptimizedModule

    eager = _tiny_trainer(tmp_path / "eager", batch=8, accumulation=1, max_steps=2)
    eager.train()
    trainer = _tiny_trainer(tmp_path / "compiled", batch=8, accumulation=1, max_steps=2, torch_compile=True,
                            save_strategy="steps", save_steps=2)
    trainer.train()
    compiled, model = trainer.model_wrapped, trainer.model
    assert isinstance(compiled, OptimizedModule) and compiled._orig_mod is model  # it did train compiled

    expected, trained = eager.model.adapter_state_dict(), model.adapter_state_dict()
    untouched = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16)).adapter_state_dict()
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)  # the steps moved the weights
    for key in expected:  # inductor's kernels round differently from eager's, no more
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5)

    trainer.save_model(tmp_path / "adapter")
    for folder in (tmp_path / "adapter", tmp_path / "compiled" / "checkpoint-2"):
        assert CONFIG_NAME in _saved_files(folder) and "model.safetensors" not in _saved_files(folder)
        assert all(k.startswith(("read.", "head.")) for k in load_file(folder / WEIGHTS_NAME))

    # The compiled module itself: its state dict names everything under `_orig_mod.`, and saves the same adapter
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    model.save_pretrained(tmp_path / "from-state-dict", state_dict=compiled.state_dict())
    compiled.save_pretrained(tmp_path / "from-wrapper")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    for other in ("from-state-dict", "from-wrapper"):
        again = load_file(tmp_path / other / WEIGHTS_NAME)
        assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

    batch = make_batch("bert")
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        reloaded = ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "adapter")(**batch).logits
        through_compiled = compiled(**batch).logits
    assert torch.equal(reloaded, logits)
    torch.testing.assert_close(through_compiled, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_model_compiled_in_place_trains_with_trainer_as_itself(tmp_path):
    """`model.compile()` compiles the ReadModel's call in place: Trainer sees the ReadModel (its columns, labels,
    saving), the state dict keeps its keys. dynamo's own `eager` backend: the tracing through READ's hooks is what
    is checked here (the inductor test above covers code generation)."""
    from torch._dynamo.utils import counters

    eager = _tiny_trainer(tmp_path / "eager", batch=8, accumulation=1, max_steps=2)
    eager.train()
    model = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16))
    for module in model.modules():  # as _tiny_trainer does for the model it builds
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    model.compile(backend="eager")
    counters.clear()
    trainer = _tiny_trainer(tmp_path / "compiled", batch=8, accumulation=1, max_steps=2, model=model)
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert counters["stats"]["unique_graphs"] > 0  # it ran compiled
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
    expected, trained = eager.model.adapter_state_dict(), model.adapter_state_dict()
    assert all(torch.equal(trained[k], expected[k]) for k in expected)  # the eager backend runs the same kernels
    trainer.save_model(tmp_path / "adapter")
    assert "model.safetensors" not in _saved_files(tmp_path / "adapter")


def test_save_pretrained_takes_the_state_dict_of_a_compiled_model(tmp_path):
    """`torch.compile(model).state_dict()` keys are `_orig_mod.<the model's key>`; save_pretrained(state_dict=...)
    (Trainer's path under DeepSpeed / FSDP) finds the adapter in it. Nothing is compiled: state_dict() and
    attribute access do not run the compiler."""
    model = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16))
    batch = make_batch("bert")
    train_steps(model, batch, steps=2)
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    model.save_pretrained(tmp_path / "a", state_dict=compiled.state_dict())
    compiled.save_pretrained(tmp_path / "b")  # torch.compile's wrapper hands save_pretrained to the model
    expected = model.adapter_state_dict()
    for folder in ("a", "b"):
        saved = load_file(tmp_path / folder / WEIGHTS_NAME)
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "a")(**inputs).logits,
                           model.eval()(**inputs).logits)


def test_a_compiled_backbone_is_refused_with_what_to_compile_instead():
    """Attached to torch.compile(backbone), READ would find no head to train (its names are the wrapper's) and save
    an adapter that records no backbone: refused, naming what to compile instead."""
    with pytest.raises(ConfigError, match=r"torch.compile wrapper .*compile the READ model instead"):
        get_read_model(torch.compile(tiny_backbone("bert")), ReadConfig(hidden_size=16))
