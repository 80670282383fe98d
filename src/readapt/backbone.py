"""Find, in a Hugging Face model, what READ attaches to: its family, its transformer stacks, its task head.

Detection reads the model's config and module structure (a stack is the parent of the outermost list of
identical transformer blocks), not a list of model names, so new models of a known shape work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from readapt.errors import UnsupportedModelError

ENCODER_DECODER = "encoder-decoder"
ENCODER_ONLY = "encoder-only"
DECODER_ONLY = "decoder-only"

SUPPORTED = (
    "readapt supports three transformer families: encoder-decoder (T5, mT5, BART *ForConditionalGeneration), "
    "encoder-only (BERT, RoBERTa, DeBERTa-v2, MiniLM *ForSequenceClassification) and decoder-only "
    "(GPT-2, Llama, Qwen2, Mistral *ForCausalLM / *ForSequenceClassification)"
)

# Children of the top-level model that are task heads added on top of the pretrained body; they are
# trained with READ. Pretrained LM heads and embeddings stay frozen (see describe_backbone for poolers).
HEAD_MODULE_NAMES = ("classifier", "score", "pooler", "pre_classifier", "qa_outputs", "classification_head")


@dataclass
class Stack:
    name: str  # "encoder" or "decoder"
    module: nn.Module  # runs the whole stack; its first output is the final hidden state (after final norm)
    layers: nn.ModuleList
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class BackboneInfo:
    family: str
    stacks: list[Stack]
    head_modules: list[str]
    model_type: str
    architecture: str

    @property
    def sequence_head(self) -> bool:
        """Whether the head reads the whole sequence once (a sequence classifier): the stack then never continues a
        KV cache, so READ may mix tokens on a decoder-only backbone too."""
        return self.architecture.endswith("ForSequenceClassification")

    def signature(self) -> dict:
        """What an adapter records about the backbone it was trained on, checked when loading."""
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "family": self.family,
            "stacks": {s.name: {"num_layers": s.num_layers, "hidden_size": s.hidden_size} for s in self.stacks},
        }


def _unsupported(model: nn.Module, reason: str) -> UnsupportedModelError:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return UnsupportedModelError(f"unsupported model {type(model).__name__} ({model_type}): {reason}; {SUPPORTED}")


def find_layer_list(root: nn.Module, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The shallowest ModuleList of identical blocks under `root`, and the module that holds it."""
    candidates = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            candidates.append((name.count("."), name, module))
    if not candidates:
        raise _unsupported(model, f"no list of transformer layers found in {type(root).__name__}")
    depth = min(c[0] for c in candidates)
    shallowest = [c for c in candidates if c[0] == depth]
    if len(shallowest) > 1:
        names = ", ".join(c[1] for c in shallowest)
        raise _unsupported(model, f"several layer lists at the same depth ({names}); cannot tell which one is the text stack")
    _, name, layers = shallowest[0]
    parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
    return parent, layers


def is_causal_config(config) -> bool:
    """True for a decoder-only (GPT-style) model's config."""
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def describe_backbone(model: nn.Module) -> BackboneInfo:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise _unsupported(model, "not a Hugging Face PreTrainedModel")
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise _unsupported(model, "it has no token embedding (not a text transformer)")
    hidden_size = getattr(config, "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise _unsupported(model, "its config has no hidden_size")

    if getattr(config, "is_encoder_decoder", False):
        family = ENCODER_DECODER
        encoder, decoder = model.get_encoder(), model.get_decoder()
        if encoder is model or decoder is model:
            raise _unsupported(model, "encoder-decoder config but no separate encoder and decoder modules")
        roots = [("encoder", encoder), ("decoder", decoder)]
    else:
        family = DECODER_ONLY if is_causal_config(config) else ENCODER_ONLY
        roots = [("decoder" if family == DECODER_ONLY else "encoder", model.base_model)]

    stacks = []
    for stack_name, root in roots:
        module, layers = find_layer_list(root, model)
        stacks.append(Stack(stack_name, module, layers, hidden_size))

    base = model.base_model
    head_modules = [
        name for name, child in model.named_children()
        if child is not base and name in HEAD_MODULE_NAMES and any(True for _ in child.parameters())
    ]
    # BERT-style encoders put a pooler (the pretraining head's dense + tanh over [CLS]) inside the body,
    # between the corrected states and the classifier. Frozen, it squashes the correction: on
    # all-MiniLM-L6-v2 it maps [CLS] to outputs of ~0.05, and READ did not learn SST-2 at all (dev accuracy
    # stuck at the majority class) until the pooler trained with the classifier. It is part of the task head.
    pooler = getattr(base, "pooler", None)
    if family == ENCODER_ONLY and head_modules and isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        head_modules.append(f"{model.base_model_prefix}.pooler")
    return BackboneInfo(family, stacks, head_modules, config.model_type, type(model).__name__)
