"""LST's structural pruning: which rows and columns of each frozen backbone layer's weights initialise the
ladder side network (importance by L1 norm; see readapt.methods.lst for the method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from readapt.errors import UnsupportedModelError


# ------------------------------------------------------------------ reading a backbone block
@dataclass(frozen=True)
class Layout:
    """Where a backbone block keeps its weights (submodule paths by side-block role) and how it computes."""

    paths: dict[str, Any]
    pre_norm: bool
    activation: str  # the config attribute naming the FFN activation
    scaled: bool = True  # False: T5 does not scale q.k by 1/sqrt(head_dim)
    position: str | None = None  # "relative-bias" (T5), "rotary" (Llama), None: positions are in h_0


LAYOUTS = {
    "bert": Layout({"attn": ("attention.self.query", "attention.self.key", "attention.self.value",
                              "attention.output.dense"),
                     "attn_norm": "attention.output.LayerNorm", "up": "intermediate.dense", "down": "output.dense",
                     "ffn_norm": "output.LayerNorm"}, pre_norm=False, activation="hidden_act"),
    "bart": Layout({"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                     "attn_norm": "self_attn_layer_norm",
                     "cross": ("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj",
                               "encoder_attn.out_proj"),
                     "cross_norm": "encoder_attn_layer_norm", "up": "fc1", "down": "fc2",
                     "ffn_norm": "final_layer_norm"}, pre_norm=False, activation="activation_function"),
    "gpt2": Layout({"attn": ("attn.c_attn", "attn.c_proj"), "attn_norm": "ln_1", "up": "mlp.c_fc",
                     "down": "mlp.c_proj", "ffn_norm": "ln_2"}, pre_norm=True, activation="activation_function"),
    "llama": Layout({"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                      "attn_norm": "input_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                      "down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm"},
                     pre_norm=True, activation="hidden_act", position="rotary"),
    # FF: T5's feed-forward sublayer is the block's last one (layer.1 in the encoder, layer.2 in the decoder).
    "t5": Layout({"attn": ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                            "layer.0.SelfAttention.o"), "attn_norm": "layer.0.layer_norm",
                   "cross": ("layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
                             "layer.1.EncDecAttention.o"), "cross_norm": "layer.1.layer_norm",
                   "up": "FF.DenseReluDense.wi", "down": "FF.DenseReluDense.wo", "ffn_norm": "FF.layer_norm"},
                  pre_norm=True, activation="dense_act_fn", scaled=False, position="relative-bias"),
}


def layout_name(layer: nn.Module) -> str:
    names = dict(layer.named_modules())
    if "layer.0.SelfAttention" in names:
        return "t5"
    if "attention.self.query" in names:
        return "bert"
    if "attn.c_attn" in names:
        return "gpt2"
    if "mlp.gate_proj" in names and "self_attn.q_proj" in names:
        return "llama"
    if "fc1" in names and "self_attn.q_proj" in names and type(layer).__name__.startswith("Bart"):
        return "bart"
    raise UnsupportedModelError(
        f"lst builds its side blocks from BERT/RoBERTa, T5/mT5, BART, GPT-2 and Llama/Qwen2/Mistral layers; "
        f"{type(layer).__name__} is none of these"
    )


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [out, in], bias) of an nn.Linear or of transformers' Conv1D (GPT-2 stores [in, out])."""
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    return weight, module.bias


def read_layer(layer: nn.Module, layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """A backbone layer's weights under the side block's parameter names, at full size, and its norm modules."""
    paths = dict(layout.paths)
    if "FF" in str(paths["up"]):  # T5: the last sublayer; gated FFN (T5 v1.1, mT5) has wi_0 (activated) and wi_1
        ff = f"layer.{len(layer.layer) - 1}"
        paths = {role: path.replace("FF", ff) if isinstance(path, str) else path for role, path in paths.items()}
        if hasattr(layer.get_submodule(f"{ff}.DenseReluDense"), "wi_0"):
            paths["gate"], paths["up"] = f"{ff}.DenseReluDense.wi_0", f"{ff}.DenseReluDense.wi_1"
    modules = dict(layer.named_modules())
    if "cross" in paths and paths["cross"][0] not in modules:  # an encoder block: no cross-attention
        del paths["cross"], paths["cross_norm"]
    full: dict[str, torch.Tensor] = {}
    norms: dict[str, nn.Module] = {}
    for role, path in paths.items():
        if isinstance(path, tuple):  # an attention: q, k, v, o (or GPT-2's fused qkv and o)
            linears = [_linear(modules[p]) for p in path]
            if len(linears) == 2:  # GPT-2: c_attn holds q, k and v stacked on its output axis
                (qkv, qkv_bias), out = linears
                linears = [(w, b) for w, b in zip(qkv.chunk(3), qkv_bias.chunk(3), strict=True)] + [out]
            for name, (weight, bias) in zip("qkvo", linears, strict=True):
                full[f"{role}.{name}.weight"] = weight
                if bias is not None:
                    full[f"{role}.{name}.bias"] = bias
        elif role.endswith("norm"):
            norms[role] = modules[path]
            full[f"{role}.weight"] = modules[path].weight
            if getattr(modules[path], "bias", None) is not None:
                full[f"{role}.bias"] = modules[path].bias
        else:
            weight, bias = _linear(modules[path])
            full[f"{role}.weight"] = weight
            if bias is not None:
                full[f"{role}.bias"] = bias
    return {name: t.detach().float() for name, t in full.items()}, norms


# ------------------------------------------------------------------ structured magnitude pruning
def top_k_indices(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, in increasing order (ties: the lower index)."""
    return torch.argsort(importance, descending=True, stable=True)[:k].sort().values


def _top_rotary(importance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head offsets for rotary q / k: k // 2 whole pairs (j, j + head_dim / 2), laid out as [firsts, seconds]
    so that the side head rotates them as the backbone does; an odd k adds one unrotated offset at the end.
    Returns the offsets and the kept pair indices (which select the rotary frequencies)."""
    half = importance.numel() // 2
    pairs = top_k_indices(importance[:half] + importance[half:2 * half], k // 2)
    offsets = torch.cat((pairs, pairs + half))
    if k % 2:
        rest = importance.clone()
        rest[offsets] = -torch.inf
        offsets = torch.cat((offsets, rest.argmax().view(1)))
    return offsets, pairs


def hidden_importance(full: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per hidden dim: L1 of its columns in the weights that read the residual stream, rows in those that write it."""
    readers = ("attn.q", "attn.k", "attn.v", "cross.q", "up", "gate")
    writers = ("attn.o", "cross.o", "down")
    total = sum(full[f"{m}.weight"].abs().sum(0) for m in readers if f"{m}.weight" in full)
    return total + sum(full[f"{m}.weight"].abs().sum(1) for m in writers if f"{m}.weight" in full)


def _heads(full: dict[str, torch.Tensor], role: str, heads: int) -> tuple[int, int]:
    """(head_dim, kv_heads) of an attention, from its q and k weights."""
    head_dim = full[f"{role}.q.weight"].shape[0] // heads
    return head_dim, full[f"{role}.k.weight"].shape[0] // head_dim


def _rows(offsets: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The same offsets inside each of `heads` consecutive heads of size head_dim."""
    return (torch.arange(heads)[:, None] * head_dim + offsets[None, :]).reshape(-1)


def _select(tensor: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    for axis, kept in enumerate(index):
        tensor = tensor.index_select(axis, kept)
    return tensor.clone()


@dataclass
class Pruned:
    """One side block's initial weights (side parameter name -> tensor) and how they were cut."""

    state: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]  # "hidden", "memory", "ffn", "attn.qk", "attn.vo", "cross.qk", "cross.vo"
    rotary_pairs: torch.Tensor | None = None


def prune_layer(full: dict[str, torch.Tensor], hidden: torch.Tensor, memory: torch.Tensor | None, heads: int,
                 r: int, rotary: bool) -> Pruned:
    kept = {"hidden": hidden}
    index: dict[str, tuple[torch.Tensor, ...]] = {}
    rotary_pairs = None
    for role in ("attn", "cross"):
        if f"{role}.q.weight" not in full:
            continue
        head_dim, kv_heads = _heads(full, role, heads)
        q, k, v, o = (full[f"{role}.{n}.weight"].abs() for n in "qkvo")
        qk = q.sum(1).view(heads, head_dim).sum(0) + k.sum(1).view(kv_heads, head_dim).sum(0)
        vo = v.sum(1).view(kv_heads, head_dim).sum(0) + o.sum(0).view(heads, head_dim).sum(0)
        if rotary and role == "attn":
            kept[f"{role}.qk"], rotary_pairs = _top_rotary(qk, head_dim // r)
        else:
            kept[f"{role}.qk"] = top_k_indices(qk, head_dim // r)
        kept[f"{role}.vo"] = top_k_indices(vo, head_dim // r)
        source = hidden if role == "attn" else memory
        index[f"{role}.q"] = (_rows(kept[f"{role}.qk"], heads, head_dim), hidden)
        index[f"{role}.k"] = (_rows(kept[f"{role}.qk"], kv_heads, head_dim), source)
        index[f"{role}.v"] = (_rows(kept[f"{role}.vo"], kv_heads, head_dim), source)
        index[f"{role}.o"] = (hidden, _rows(kept[f"{role}.vo"], heads, head_dim))
        index[f"{role}_norm"] = (hidden,)
    if memory is not None:
        kept["memory"] = memory
    up = full["up.weight"].abs()
    ffn = up.sum(1) + full["down.weight"].abs().sum(0)
    if "gate.weight" in full:
        ffn = ffn + full["gate.weight"].abs().sum(1)
    kept["ffn"] = top_k_indices(ffn, max(1, up.shape[0] // r))
    index.update(up=(kept["ffn"], hidden), gate=(kept["ffn"], hidden), down=(hidden, kept["ffn"]), ffn_norm=(hidden,))

    state = {}
    for name, tensor in full.items():
        module, _, kind = name.rpartition(".")
        axes = index[module] if kind == "weight" else index[module][:1]  # a bias lies along the output axis
        state[name] = _select(tensor, *axes)
    return Pruned(state, kept, rotary_pairs)


# ------------------------------------------------------------------ the side network
def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def norm_like(template: nn.Module, width: int) -> nn.Module:
    """A fresh norm of the backbone norm's kind (LayerNorm, else RMSNorm) and epsilon, at the side width."""
    if isinstance(template, nn.LayerNorm):
        return nn.LayerNorm(width, eps=template.eps, bias=template.bias is not None)
    eps = getattr(template, "variance_epsilon", None) or getattr(template, "eps", None) or 1e-6
    return nn.RMSNorm(width, eps=eps)
