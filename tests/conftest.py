"""Shared fixtures: tiny random backbones of every supported family, and helpers to train READ a little."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real GLUE data (never copied into the repo): $READAPT_GLUE_DIR, else ../shared/data/glue beside the repo.
REAL_GLUE_DIR = Path(os.environ.get("READAPT_GLUE_DIR") or REPO_ROOT.parent / "shared" / "data" / "glue")
needs_real_glue = pytest.mark.skipif(
    not REAL_GLUE_DIR.is_dir(),
    reason=f"real GLUE data not found at {REAL_GLUE_DIR} (set READAPT_GLUE_DIR to the GLUE TSV folder)",
)

VOCAB = 64
FAMILIES = ["t5", "bart", "bert", "gpt2", "llama"]
GENERATIVE = ["t5", "bart", "gpt2", "llama"]


def tiny_backbone(kind: str, num_layers: int = 2, width: int = 32, seed: int = 0):
    """A small random model of the given family, in eval mode."""
    torch.manual_seed(seed)
    if kind == "t5":
        # transformers 5.24 generate() breaks when num_decoder_layers != num_layers (its cache is sized
        # from num_layers), so the tiny T5 keeps the two equal.
        config = T5Config(vocab_size=VOCAB, d_model=width, d_kv=8, d_ff=2 * width, num_layers=num_layers,
                          num_decoder_layers=num_layers, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1)
        model = T5ForConditionalGeneration(config)
    elif kind == "bart":
        config = BartConfig(vocab_size=VOCAB, d_model=width, encoder_layers=num_layers, decoder_layers=num_layers,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * width,
                            decoder_ffn_dim=2 * width, max_position_embeddings=64, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
        model = BartForConditionalGeneration(config)
    elif kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=num_layers, num_attention_heads=4,
                            intermediate_size=2 * width, max_position_embeddings=64, num_labels=3)
        model = BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=num_layers, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=1, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=1, pad_token_id=0)
        model = LlamaForCausalLM(config)
    elif kind == "llama-cls":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, num_labels=2)
        model = LlamaForSequenceClassification(config)
    else:
        raise ValueError(kind)
    return model.eval()


def make_batch(kind: str, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Input ids (with right padding on the last row) and labels suited to the family's head."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length - 2:] = 0
    pad = 1 if kind == "bart" else 0
    input_ids[-1, length - 2:] = pad
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind in ("t5", "bart"):
        out["labels"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    elif kind == "bert":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif kind == "llama-cls":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    else:
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        out["labels"] = labels
    return out


def train_steps(model, batch, steps: int = 5, lr: float = 0.05) -> list[float]:
    """A few AdamW steps so that the correction is no longer zero; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def generation_kwargs(kind: str) -> dict:
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    if kind in ("gpt2", "llama"):
        kwargs["pad_token_id"] = 0
    return kwargs


class SavedTensorCounter:
    """Counts tensors that autograd saves for backward, split by whether a module of a backbone stack (its
    embeddings, layers, final norm) is running. The stack module itself is left out: READ's wrapper computes
    the side network inside its call, after the frozen body has returned."""

    def __init__(self, model):
        from readapt.backbone import describe_backbone

        self.depth = 0
        self.inside_stack = 0
        self.outside_stack = 0
        self.handles = []
        info = getattr(model, "info", None) or describe_backbone(getattr(model, "backbone", model))
        for stack in info.stacks:
            for module in stack.module.modules():
                if module is stack.module:
                    continue
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def pack(self, tensor):
        if self.depth > 0:
            self.inside_stack += 1
        else:
            self.outside_stack += 1
        return tensor

    def close(self):
        for handle in self.handles:
            handle.remove()


def backward_with_counter(model, batch):
    """Forward in train mode under the counter, then backward; returns the counter."""
    counter = SavedTensorCounter(model)
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = model(**batch).loss
    finally:
        counter.close()
    loss.backward()
    return counter


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def _save_tiny(model, path: Path) -> Path:
    """A tiny random backbone saved as a local HF folder, with the embedded backbone's (BERT) tokenizer."""
    from readapt.pretrained import embedded_backbone_dir

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_backbone_dir()).save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    """READ runs use the feature cache by default: keep the tests' entries out of the user's ~/.cache."""
    previous = os.environ.get("READAPT_CACHE_DIR")
    os.environ["READAPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if previous is None:
        os.environ.pop("READAPT_CACHE_DIR", None)
    else:
        os.environ["READAPT_CACHE_DIR"] = previous


@pytest.fixture
def step_losses(monkeypatch) -> list[float]:
    """Every training step's loss, in order (the training loop calls ReadModel.forward once per step)."""
    from readapt.read.model import ReadModel

    losses: list[float] = []
    forward = ReadModel.forward

    def recording(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            losses.append(output.loss.item())
        return output

    monkeypatch.setattr(ReadModel, "forward", recording)
    return losses


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    vocab = 30522  # the BERT tokenizer's
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=102))
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, pad_token_id=0))
    # causal LMs (label words, generation); the BERT tokenizer's [SEP] (102) ends their answers. Weights 10x
    # the usual init scale: with the usual 0.02 a width-32 LM head barely moves its 30k logits (at init they are
    # all ~0), and a tiny task takes hundreds of steps to show any learning.
    llama_lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                            bos_token_id=101, eos_token_id=102, initializer_range=0.2))
    gpt2_lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                         bos_token_id=101, eos_token_id=102, pad_token_id=0, initializer_range=0.2))
    models = (("bert", bert), ("t5", t5), ("llama", llama), ("llama-lm", llama_lm), ("gpt2-lm", gpt2_lm))
    return {name: _save_tiny(model, root / name) for name, model in models}
