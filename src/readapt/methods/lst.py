"""LST: Ladder Side-Tuning (Sung, Cho & Bansal 2022), a small side transformer fed by the frozen backbone.

The backbone runs exactly as READ runs it (readapt.read.attach): each adapted stack's `forward` is wrapped so that
the stack runs under `torch.no_grad()` and in eval mode, forward hooks copy the input of layer 0 (the
embedding output h_0) and the output h_i of every layer i, and after the stack returns the side network
runs on those copies with gradients. Nothing inside a backbone stack is ever saved for backward.

Side network of one stack (width w = d / r, r = `reduction_factor`; one side block per backbone layer):

    s = down_0(h_0)                                            # d -> w, one linear map per ladder rung
    for layer i:  g_i = sigmoid(alpha_i / T)                   # learned scalar alpha_i, T = gate_temperature
                  s = g_i * s + (1 - g_i) * down_{i+1}(h_i)    # the paper's learnable gate
                  s = side_block_i(s)
    s = final_norm(s)                                          # pre-norm backbones only (as the paper's T5)
    stack output: final + up(s)                                # w -> d, up zero-initialised

so the untrained model computes exactly what the backbone computes, and everything after the stack (pooler,
classifier, LM head) is the backbone's own code. The paper feeds the up-projected side state alone to the
head; `final + up(s)` keeps the backbone's function at init instead.

Side block: our own small transformer block (attention, optional cross-attention, feed-forward, norms)
that mirrors the backbone block's computation: pre- or post-norm, LayerNorm or RMSNorm, the backbone's
activation (gated FFN for Llama / T5 v1.1), biases where the backbone has them, T5's unscaled attention with
the backbone's own (frozen) relative position bias, Llama's rotary embedding, grouped-query attention. The
backbone's block classes are not reused: their call conventions (masks, caches, position inputs) differ per
model and per transformers release; this block has one. Heads are kept, each head shrinks to head_dim / r.
Decoder stacks (decoder-only, and the decoder of encoder-decoder models) attend causally. The decoder side
network of an encoder-decoder model cross-attends to the encoder side network's final states (width w), as
in the paper: the backbone decoder sees the backbone encoder's own output, so the loss back-propagates into
the encoder side network through the side decoder only, never through the backbone. The encoder side
states travel with the encoder output under LST_ENCODER_STATES, so that `model.get_encoder()(...)` then
`model(encoder_outputs=...)` equals `model(input_ids=...)`. Generation runs without a KV cache.

Initialisation by structured magnitude pruning (the paper ranks by Fisher information, which needs task
data; we rank by weight magnitude, as its Torch-Pruning L1 strategy does). Side block i is backbone layer i
restricted to kept indices, each set the top-k (k = size / r) by L1 norm:
  - hidden dims H (one set per stack, shared by all blocks since they share the residual stream): the sum
    over layers of the L1 norms of each hidden dim's column in the weights that read the stream (q, k, v,
    FFN in / gate, cross q) and its row in the weights that write it (attention out, cross out, FFN out);
  - FFN units, per layer: L1 of the unit's rows in FFN in (and gate) plus its column in FFN out;
  - attention, per layer and per attention: the same head_dim / r offsets inside every head, one set for
    q / k (L1 of those rows over all q and k heads; for rotary models whole rotary pairs, so the side
    rotation uses the backbone's frequencies) and one for v / o (rows of v, columns of o);
  - cross-attention k / v read the encoder side states, so their input columns are the encoder's set H.
The ladder down-projections start as the selection of H (s starts as the pruned backbone state), the gates
at alpha = gate_init (g = 0.5 by default, as in the paper), and the up-projection at zero.

Trained: the side networks and the task head (`BackboneInfo.head_modules`); see `LadderSideTuning`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from readapt.backbone import ENCODER_DECODER, BackboneInfo, Stack
from readapt.errors import ConfigError, IncompatibleAdapterError, UnsupportedModelError
from readapt.frozen import FrozenBackboneWrapper, first_tensor
from readapt.methods.base import PartialMethod, require_positive_int
from readapt.methods.lst_pruning import (
    LAYOUTS,
    Layout,
    Pruned,
    hidden_importance,
    layout_name,
    linear_from,
    norm_like,
    prune_layer,
    read_layer,
    top_k_indices,
)

LST_ENCODER_STATES = "lst_encoder_states"


class SideAttention(nn.Module):
    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, heads: int, scaled: bool,
                 dropout: float, rotary_freq: torch.Tensor | None = None, rotary_scaling: float = 1.0):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.heads = heads
        self.head_dim = q.out_features // heads
        self.kv_heads = k.out_features // self.head_dim
        self.scale = self.head_dim ** -0.5 if scaled else 1.0
        self.dropout = dropout
        self.rotary_scaling = rotary_scaling
        self.register_buffer("rotary_freq", rotary_freq, persistent=False)  # the backbone's, at the kept pairs

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        n = self.rotary_freq.numel()
        angles = position_ids[:, None, :, None].to(self.rotary_freq.dtype) * self.rotary_freq  # (B, 1, T, n)
        cos, sin = angles.cos() * self.rotary_scaling, angles.sin() * self.rotary_scaling
        x1, x2, rest = x[..., :n], x[..., n:2 * n], x[..., 2 * n:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    def forward(self, x, memory, mask, position_bias=None, position_ids=None):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(memory).view(batch, memory.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(memory).view(batch, memory.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary_freq is not None:
            q, k = self._rotate(q, position_ids), self._rotate(k, position_ids)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if position_bias is not None:
            mask = position_bias if mask is None else mask + position_bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class SideBlock(nn.Module):
    """One side transformer block, computing as the backbone block it was pruned from (see the module doc)."""

    def __init__(self, pruned: Pruned, norms: dict[str, nn.Module], layout: Layout, activation: str, heads: int,
                 dropout: float, rotary: tuple[torch.Tensor, float] | None = None):
        super().__init__()
        state = pruned.state
        self.kept = pruned.kept  # plain attribute: the backbone indices each weight was cut from
        self.pre_norm = layout.pre_norm
        for role in ("attn", "cross"):
            if f"{role}.q.weight" in state:
                linears = [linear_from(state[f"{role}.{n}.weight"], state.get(f"{role}.{n}.bias")) for n in "qkvo"]
                freq = rotary[0][pruned.rotary_pairs] if rotary is not None and role == "attn" else None
                setattr(self, role, SideAttention(*linears, heads=heads, scaled=layout.scaled, dropout=dropout,
                                                  rotary_freq=freq, rotary_scaling=rotary[1] if rotary else 1.0))
        self.has_cross = hasattr(self, "cross")
        self.gate = linear_from(state["gate.weight"], state.get("gate.bias")) if "gate.weight" in state else None
        self.up = linear_from(state["up.weight"], state.get("up.bias"))
        self.down = linear_from(state["down.weight"], state.get("down.bias"))
        width = self.up.in_features
        for role, template in norms.items():
            norm = norm_like(template, width)
            with torch.no_grad():
                norm.weight.copy_(state[f"{role}.weight"])
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(state[f"{role}.bias"])
            setattr(self, role, norm)
        self.act = ACT2FN[activation]
        self.drop = nn.Dropout(dropout)

    def _sublayer(self, x, norm, function):
        if self.pre_norm:
            return x + self.drop(function(norm(x)))
        return norm(x + self.drop(function(x)))

    def _ffn(self, x):
        hidden = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.drop(hidden))

    def forward(self, x, mask, position_bias=None, position_ids=None, memory=None, memory_mask=None):
        x = self._sublayer(x, self.attn_norm, lambda h: self.attn(h, h, mask, position_bias, position_ids))
        if self.has_cross:
            x = self._sublayer(x, self.cross_norm, lambda h: self.cross(h, memory, memory_mask))
        return self._sublayer(x, self.ffn_norm, self._ffn)


class LadderSideNetwork(nn.Module):
    """The side network of one backbone stack: ladder down-projections, gates, side blocks, up-projection."""

    def __init__(self, stack: Stack, config, options: dict[str, Any], memory_hidden: torch.Tensor | None,
                 upsample: bool):
        super().__init__()
        r = options["reduction_factor"]
        d, width = stack.hidden_size, stack.hidden_size // r
        layout = LAYOUTS[layout_name(stack.layers[0])]
        self.position = layout.position
        layers = [read_layer(layer, layout) for layer in stack.layers]
        self.hidden_index = top_k_indices(sum(hidden_importance(full) for full, _ in layers), width)
        self.temperature = options["gate_temperature"]
        heads = getattr(config, "decoder_attention_heads", None) if stack.name == "decoder" else None
        heads = heads or config.num_attention_heads
        rotary = None
        if layout.position == "rotary":
            rotary_emb = getattr(stack.module, "rotary_emb", None)
            if rotary_emb is None or not hasattr(rotary_emb, "inv_freq"):
                raise UnsupportedModelError(f"lst: {type(stack.module).__name__} has no rotary_emb.inv_freq to follow")
            rotary = (rotary_emb.inv_freq.detach().float().cpu(), float(getattr(rotary_emb, "attention_scaling", 1.0)))
        self.blocks = nn.ModuleList(
            SideBlock(prune_layer(full, self.hidden_index, memory_hidden, heads, r, rotary is not None), norms, layout,
                      getattr(config, layout.activation), heads, options["dropout"], rotary)
            for full, norms in layers
        )
        self.downsample = nn.ModuleList(nn.Linear(d, width) for _ in range(stack.num_layers + 1))
        with torch.no_grad():  # each rung starts as the selection of the kept hidden dims
            for down in self.downsample:
                down.weight.zero_()
                down.weight[torch.arange(width), self.hidden_index] = 1.0
                down.bias.zero_()
        self.gate_alpha = nn.Parameter(torch.full((stack.num_layers,), float(options["gate_init"])))
        self.final_norm = norm_like(layers[0][1]["attn_norm"], width) if layout.pre_norm else None
        self.upsample = nn.Linear(width, d) if upsample else None
        if self.upsample is not None:
            nn.init.zeros_(self.upsample.weight)
            nn.init.zeros_(self.upsample.bias)

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_alpha / self.temperature)

    def forward(self, embeddings, states, mask, position_bias=None, position_ids=None, memory=None,
                memory_mask=None):
        """The final side state (width d / r), from the stack's embedding output and its layers' outputs."""
        side = self.downsample[0](embeddings)
        gates = self.gates()
        for i, block in enumerate(self.blocks):
            side = gates[i] * side + (1 - gates[i]) * self.downsample[i + 1](states[i])
            side = block(side, mask, position_bias, position_ids, memory, memory_mask)
        return self.final_norm(side) if self.final_norm is not None else side


# ------------------------------------------------------------------ the model: backbone + side networks
class _Capture:
    """One stack forward's embedding output and layer outputs, copied as they appear (side dtype)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.embeddings: torch.Tensor | None = None
        self.states: list[torch.Tensor] = []


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as an additive one: 0 or the dtype's minimum (finite: fully masked rows stay finite)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class LSTModel(FrozenBackboneWrapper):
    """A frozen backbone with ladder side networks on its stacks; `forward` is the backbone's forward."""

    def __init__(self, backbone: nn.Module, info: BackboneInfo, options: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.info = info
        self.head_module_names = list(info.head_modules)
        side: dict[str, LadderSideNetwork] = {}
        for stack in info.stacks:
            encoder_side = side.get("encoder") if info.family == ENCODER_DECODER and stack.name == "decoder" else None
            upsample = not (info.family == ENCODER_DECODER and stack.name == "encoder")
            side[stack.name] = LadderSideNetwork(stack, backbone.config, options,
                                                 encoder_side.hidden_index if encoder_side else None, upsample)
        self.side = nn.ModuleDict(side)
        self.side.to(next(backbone.parameters()).device)

        self._captures: dict[str, _Capture] = {}
        self._call: dict[str, Any] | None = None  # the running top-level call's masks and encoder side states
        self._signature = inspect.signature(backbone.forward)
        self._hooks: list = []
        self._wrapped: list[nn.Module] = []
        for stack in info.stacks:
            for index, layer in enumerate(stack.layers):
                self._hooks.append(layer.register_forward_hook(functools.partial(self._on_layer, stack.name, index)))
            self._hooks.append(stack.layers[0].register_forward_pre_hook(
                functools.partial(self._on_embeddings, stack.name), with_kwargs=True))
            self._wrap_stack(stack)
        self._hooks.append(backbone.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._hooks.append(backbone.register_forward_hook(self._on_model_return, always_call=True))
        self.train(backbone.training)

    # ---------------------------------------------------------------- hooks
    def _on_model_call(self, module, args, kwargs) -> None:
        try:
            arguments = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = kwargs
        self._call = {key: arguments.get(key) for key in ("attention_mask", "decoder_attention_mask")}
        if self.info.family == ENCODER_DECODER:
            encoder_outputs = arguments.get("encoder_outputs")
            if encoder_outputs is None:
                self._call[LST_ENCODER_STATES] = None  # the encoder runs inside this call and sets them
            elif isinstance(encoder_outputs, dict) and LST_ENCODER_STATES in encoder_outputs:
                self._call[LST_ENCODER_STATES] = encoder_outputs[LST_ENCODER_STATES]
            else:
                raise IncompatibleAdapterError(
                    "encoder_outputs were computed without LST's encoder side network; compute them with this "
                    "model's encoder (model.get_encoder()) so that the side decoder can attend to them"
                )

    def _on_model_return(self, module, args, output) -> None:
        self._call = None

    def _on_layer(self, stack_name: str, index: int, module, args, output) -> None:
        capture = self._captures.get(stack_name)
        if capture is not None:
            capture.states.append(first_tensor(output).detach().to(capture.dtype, copy=True))

    def _on_embeddings(self, stack_name: str, module, args, kwargs) -> None:
        capture = self._captures.get(stack_name)
        if capture is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            capture.embeddings = hidden.detach().to(capture.dtype, copy=True)

    def _wrap_stack(self, stack: Stack) -> None:
        original = stack.module.forward
        dtype = next(self.side.parameters()).dtype

        @functools.wraps(original)
        def forward(*args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise ConfigError("LST's side network keeps no KV cache: run the model (and generate) with use_cache=False")
            capture = _Capture(dtype)
            self._captures[stack.name] = capture
            try:
                with torch.no_grad():
                    output = original(*args, **kwargs)
            finally:
                del self._captures[stack.name]
            return self._ladder(stack, capture, output, kwargs)

        stack.module.forward = forward
        self._wrapped.append(stack.module)

    # ---------------------------------------------------------------- the side pass, after the frozen stack
    def _mask_2d(self, kwargs, key: str, call_key: str, shape) -> torch.Tensor | None:
        """A (B, T) padding mask: the stack's own argument if it is one, else the top-level call's."""
        mask = kwargs.get(key)
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2) and self._call is not None:
            mask = self._call.get(call_key)
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return None
        if tuple(mask.shape) != tuple(shape):
            raise RuntimeError(f"LST: attention mask of shape {tuple(mask.shape)} for hidden states {tuple(shape)}")
        return mask.bool()

    def _ladder(self, stack: Stack, capture: _Capture, output, kwargs):
        if len(capture.states) != stack.num_layers or capture.embeddings is None:
            raise RuntimeError(f"LST saw {len(capture.states)} of {stack.num_layers} {stack.name} layers run; "
                               "the stack skipped layers or ran them outside its forward")
        final = first_tensor(output)
        batch, length = final.shape[:2]
        network = self.side[stack.name]
        dtype, device = capture.dtype, final.device
        is_decoder = stack.name == "decoder"
        seq2seq = self.info.family == ENCODER_DECODER
        padding = self._mask_2d(kwargs, "attention_mask", "decoder_attention_mask" if seq2seq and is_decoder
                                else "attention_mask", (batch, length))
        keep = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
        if padding is not None:
            keep = keep & padding[:, None, None, :]
        if is_decoder:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = additive_mask(keep, dtype)

        position_bias = position_ids = None
        if network.position == "rotary":
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(length, device=device)[None]
        elif network.position == "relative-bias":  # T5: the backbone's own relative position bias, frozen
            with torch.no_grad():
                attention = stack.layers[0].layer[0].SelfAttention
                position_bias = attention.compute_bias(length, length, device=device).to(dtype)

        memory = memory_mask = None
        if seq2seq and is_decoder:
            memory = self._call.get(LST_ENCODER_STATES) if self._call is not None else None
            if memory is None:
                raise IncompatibleAdapterError("LST's side decoder needs the encoder side states: call the model "
                                               "itself (with input_ids or LST encoder_outputs), not its decoder")
            if memory.shape[0] != batch:
                raise RuntimeError(f"LST encoder states have batch {memory.shape[0]}, the decoder has {batch}")
            encoder_padding = self._mask_2d(kwargs, "encoder_attention_mask", "attention_mask", memory.shape[:2])
            if encoder_padding is not None:
                memory_mask = additive_mask(encoder_padding[:, None, None, :], dtype)

        side = network(capture.embeddings, capture.states, mask, position_bias, position_ids, memory, memory_mask)

        if network.upsample is None:  # the encoder of an encoder-decoder model: its states feed the side decoder
            if self._call is not None:
                self._call[LST_ENCODER_STATES] = side
            if not isinstance(output, (tuple, list)):
                output[LST_ENCODER_STATES] = side
            return output
        corrected = final + network.upsample(side).to(final.dtype)
        if isinstance(output, (tuple, list)):
            return (corrected, *output[1:])
        output[next(iter(output.keys()))] = corrected
        return output

    # ---------------------------------------------------------------- nn.Module behaviour
    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The backbone's generate, without a KV cache (every step reruns the side network on the whole prefix)."""
        if kwargs.get("use_cache"):
            raise ConfigError("LST's side network keeps no KV cache: generate with use_cache=False")
        return self.backbone.generate(*args, **{**kwargs, "use_cache": False})

    def train(self, mode: bool = True):
        super().train(mode)
        for stack in self.info.stacks:  # the frozen stacks always run as at inference (no dropout)
            stack.module.eval()
        return self


class LadderSideTuning(PartialMethod):
    """LST: trains ladder side networks (module doc) and the task head; the backbone stays frozen and forward-only.

    Options: reduction_factor r (side width d / r, head size head_dim / r, FFN size ffn / r), gate_init (the
    gates' initial alpha: g = sigmoid(alpha / T)), gate_temperature T, dropout (inside the side blocks)."""

    name = "lst"
    default_lr = 3e-3  # the LST paper's rate for T5-base on GLUE
    backpropagates_through_backbone = False

    defaults = {"reduction_factor": 8, "gate_init": 0.0, "gate_temperature": 0.1, "dropout": 0.1}

    def feature_cache_problem(self, options):
        return "--method read: LST's backbone states could be cached, but LST does not replay them yet"

    def options(self, options):
        options = super().options(options)
        require_positive_int(self.name, options, "reduction_factor")
        if not options["gate_temperature"] > 0:
            raise ConfigError(f"lst option gate_temperature={options['gate_temperature']!r} must be > 0")
        if not 0.0 <= options["dropout"] < 1.0:
            raise ConfigError(f"lst option dropout={options['dropout']!r} must be in [0, 1)")
        return options

    def build(self, backbone, options, info):
        r = options["reduction_factor"]
        config = backbone.config
        for stack in info.stacks:
            heads = getattr(config, "decoder_attention_heads", None) if stack.name == "decoder" else None
            heads = heads or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or stack.hidden_size // heads
            if stack.hidden_size % r or head_dim % r:
                valid = [n for n in range(1, head_dim + 1) if stack.hidden_size % n == 0 and head_dim % n == 0]
                raise ConfigError(
                    f"lst option reduction_factor={r} must divide the hidden size {stack.hidden_size} and the attention "
                    f"head size {head_dim} of {info.architecture}; valid values: {', '.join(map(str, valid))}"
                )
        return LSTModel(backbone, info, options)
