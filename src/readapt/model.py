"""ReadModel: a frozen Hugging Face backbone with READ side networks attached to its stacks.

How the correction gets in, without copying any model code: each adapted stack's `forward` is wrapped so
that the stack runs under `torch.no_grad()` while forward hooks on its layers copy every layer's output
into one preallocated buffer; after the stack returns, the side network turns the buffer into δφ and the
wrapper returns the stack output with `final hidden state + δφ`. Everything after the stack (pooler,
classifier, LM head, generation loop, KV cache) is the backbone's own code, unchanged.

Encoder-decoder models are decoupled by default: the encoder wrapper leaves the encoder output that the
backbone decoder sees untouched and passes the corrected encoder states to the decoder side network
(Joiner), attached to the encoder output under READ_ENCODER_STATES so that `generate` carries and expands
them together with the encoder output.

Feature cache (readapt.cache): in decoupled mode a stack's states depend only on the input, so they can be
stored once and replayed. Inside `replaying(...)` a wrapped stack does not run its layers: it takes the next
cached call (layer states, final output, embedding output) and goes straight to the correction; inside
`recording(...)` it runs as usual and hands its states to the cache writer instead of correcting them.

Low-precision backbones (bfloat16 / float16 weights): the side networks and the task head stay float32; the
correction is added in float32 and the corrected state stays float32 on its way to the head (the frozen LM
head of a text-to-text model gets it in its own dtype and returns float32 logits).

Several adapters (PEFT-style `load_adapter` / `set_adapter` / `delete_adapter`): each named adapter owns its
READ config, side networks and task head modules (heads of other shapes for other label sets). The module tree
always holds the active adapter only (`self.read`, the backbone's head submodules), so a single-adapter model
is exactly what it was; the others wait in `_adapters` and are swapped in by `set_adapter`. Because every
adapter reads the same frozen states, `run_adapters` runs the frozen stacks once and replays their states to
each adapter (the feature-cache replay path), which gives each adapter exactly its own stand-alone output.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from readapt import __version__
from readapt.backbone import DECODER_ONLY, ENCODER_DECODER, BackboneInfo, Stack, describe_backbone
from readapt.cache import CachedCall
from readapt.config import ReadConfig
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from readapt.offload import is_dispatched, side_network_device
from readapt.side_network import ReadSideNetwork, pool_states, second_text_mask

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
READ_ENCODER_STATES = "read_encoder_states"
# Weight files that are Python pickles (torch.save): refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_ADAPTER = "default"


class _LayerCapture:
    """One stack forward's layer outputs, copied into a single (N, B, T, d) buffer as they appear."""

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device | None = None):
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device  # None: the first layer output's device (a dispatched backbone: the side networks')
        self.states: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None  # replayed "pooled" context inputs (states of some positions only)
        self.seen = 0

    def add(self, index: int, hidden: torch.Tensor) -> None:
        if self.states is None:
            self.states = hidden.new_empty((self.num_layers, *hidden.shape), dtype=self.dtype, device=self.device)
        self.states[index].copy_(hidden)
        self.seen += 1


def _first_tensor(output) -> torch.Tensor:
    """A layer's or stack's hidden state: a bare tensor, or the first item of a tuple / ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output[0]


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cast_floating_inputs(dtype: torch.dtype):
    """A forward pre-hook that hands a module its floating-point inputs in `dtype`."""

    def hook(module, args, kwargs):
        def cast(value):
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def _float_output(module, args, output):
    return output.float() if isinstance(output, torch.Tensor) and output.dtype in LOW_PRECISION else output


class FrozenBackboneWrapper(nn.Module):
    """What READ and LST share as wrappers of a frozen backbone: unknown attributes go to the backbone (config,
    get_encoder, generation helpers), and `unload()` removes the hooks and stack-forward wrappers that the
    subclass registered in `_hooks` / `_wrapped`, returning the untouched backbone."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone":
                raise
            return getattr(self.backbone, name)

    def unload(self) -> nn.Module:
        """Remove every hook and return the bare backbone (its weights were never changed)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self._wrapped:
            previous = getattr(module.__dict__.get("forward"), "__wrapped__", None)
            del module.forward
            if previous is not None and getattr(previous, "__self__", None) is not module:
                module.forward = previous  # an instance-level forward we wrapped (an Accelerate dispatch hook)
        self._wrapped.clear()
        return self.backbone


@dataclass
class _Adapter:
    """One named READ adapter. The active adapter's modules are the ones installed in the model; the others
    wait here until `set_adapter` swaps them in."""

    config: ReadConfig
    read: nn.ModuleDict  # side network per adapted stack
    heads: dict[str, nn.Module]  # task head modules by their name in the backbone
    labels: dict[str, Any]  # the backbone's label settings that go with these heads (see _label_settings)


def _earlier_tokens_cached(kwargs: dict, tokens: int) -> bool:
    """Whether a decoder stack's call continued a KV cache that holds tokens before this call's."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() and int(position.reshape(-1)[0]) > 0:
        return True
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x renames it "cache"
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return length > tokens  # the stack has already appended this call's tokens


def _clear_hooks(module: nn.Module) -> None:
    """A deep-copied module carries its original's hooks, which the original's handles would not remove."""
    for sub in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                     "_backward_pre_hooks"):
            hooks = getattr(sub, name, None)
            if hooks is not None:
                hooks.clear()


def _copy_call(call: CachedCall) -> CachedCall:
    """A cached stack call whose tensors the side network may normalise in place (the final output is only read)."""
    return CachedCall(call.stack, call.states.clone(), call.final,
                      None if call.embeddings is None else call.embeddings.clone(),
                      None if call.pooled is None else call.pooled.clone())


class ReadModel(FrozenBackboneWrapper):
    """A backbone with READ. Use `get_read_model(backbone, config)` or `ReadModel.from_pretrained`."""

    def __init__(self, backbone: nn.Module, config: ReadConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if not isinstance(config, ReadConfig):
            raise ConfigError(f"config must be a ReadConfig, got {type(config).__name__}")
        _check_adapter_name(adapter_name)
        info = describe_backbone(backbone)
        # sequence_context="auto", and the separator token of "segments" (readapt's loader copies the tokenizer's)
        config = config.resolved_for(info.family, getattr(getattr(backbone, "config", None), "sep_token_id", None))
        self.backbone = backbone
        self.read_config = config
        self.info: BackboneInfo = info
        self.adapted_stacks = self._select_stacks(info, config)
        self.head_module_names = self._select_heads(backbone, info, config)

        backbone.requires_grad_(False)
        for name in self.head_module_names:
            backbone.get_submodule(name).requires_grad_(True)
        self.backbone_dtype = next(backbone.parameters()).dtype

        self.read = self._side_networks(config)
        # Dispatched backbone (readapt.offload): layer states are gathered on the side networks' device.
        self._capture_device = next(self.read.parameters()).device if is_dispatched(backbone) else None

        self._captures: dict[str, _LayerCapture] = {}
        self._encoder_states: torch.Tensor | None = None
        self._replay: collections.deque | None = None  # cached stack calls still to feed (feature cache)
        self._recorder = None  # receives each stack's states while a feature cache is written
        self._shared_calls: list[CachedCall] | None = None  # run_adapters: the first adapter's stack calls
        self._positions: slice | None = None  # correcting_positions: the token positions the side networks see
        self._outer_mask: torch.Tensor | None = None  # the 2D attention mask of the running backbone call
        self._outer_input_ids: torch.Tensor | None = None  # its token ids (where "segments" finds the second text)
        self._hooks: list = []
        self._wrapped: list[nn.Module] = []
        self._embedding_hooks = False
        self._install_hooks()
        if self.backbone_dtype in LOW_PRECISION:
            self._keep_head_in_float32()
        heads = {name: backbone.get_submodule(name) for name in self.head_module_names}
        self._adapters: dict[str, _Adapter] = {adapter_name: _Adapter(config, self.read, heads, {})}
        self._active = adapter_name
        self.train(backbone.training)

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _select_stacks(info: BackboneInfo, config: ReadConfig) -> list[Stack]:
        available = {s.name: s for s in info.stacks}
        wanted = config.stacks or list(available)
        for name in wanted:
            if name not in available:
                raise ConfigError(
                    f"ReadConfig.stacks names {name!r}, but this {info.family} model has only: {', '.join(available)}"
                )
        if config.sequence_context != "none" and "encoder" not in wanted and info.family != DECODER_ONLY:
            raise ConfigError(f"ReadConfig.sequence_context={config.sequence_context!r} needs an adapted encoder stack "
                              f"or a decoder-only model; this {info.family} model adapts only: {', '.join(wanted)}")
        if info.family == ENCODER_DECODER and wanted == ["encoder"] and not config.couple_encoder:
            raise ConfigError(
                "ReadConfig.stacks=['encoder'] on an encoder-decoder model needs couple_encoder=True: "
                "decoupled, an encoder correction reaches the output only through the decoder side network"
            )
        return [s for s in info.stacks if s.name in wanted]

    @staticmethod
    def _select_heads(backbone: nn.Module, info: BackboneInfo, config: ReadConfig) -> list[str]:
        names = info.head_modules if config.head_modules is None else config.head_modules
        for name in names:
            try:
                backbone.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"ReadConfig.head_modules names {name!r}, which {info.architecture} does not have") from None
            if any(p.device.type == "meta" for p in backbone.get_submodule(name).parameters()):
                raise ConfigError(f"task head {name!r} is offloaded (meta weights), but READ trains it: keep it on a "
                                  "device (readapt.pretrained.load_backbone(device_map=...) does)")
        return list(names)

    def _side_networks(self, config: ReadConfig) -> nn.ModuleDict:
        """Fresh side networks (zero up-projections) for the adapted stacks, on the backbone's device."""
        encoder_dim = None
        if self.info.family == ENCODER_DECODER and config.encoder_context:
            encoder_dim = self.info.stacks[0].hidden_size
        # Sequence context (ReadConfig.sequence_context): encoder stacks, and decoder-only stacks as a running mean;
        # the decoder of an encoder-decoder model goes without.
        causal = self.info.family == DECODER_ONLY
        decoder_config = config if causal else dataclasses.replace(config, sequence_context="none")
        read = nn.ModuleDict({
            stack.name: ReadSideNetwork(stack.hidden_size, decoder_config if stack.name == "decoder" else config,
                                        encoder_dim if stack.name == "decoder" else None, causal=causal,
                                        num_layers=stack.num_layers)
            for stack in self.adapted_stacks
        })
        # A backbone dispatched by Accelerate (split / offloaded): the device of the final hidden state.
        return read.to(side_network_device(self.backbone, self.adapted_stacks[-1].module))

    def _install_embedding_hooks(self) -> None:
        """Capture the embedding output (READ h0 = "embeddings"); installed once, when an adapter needs it."""
        if self._embedding_hooks:
            return
        for stack in self.adapted_stacks:
            self._hooks.append(stack.layers[0].register_forward_pre_hook(
                functools.partial(self._on_embeddings, stack.name), with_kwargs=True))
        self._embedding_hooks = True

    def _install_hooks(self) -> None:
        side_dtype = next(self.read.parameters()).dtype
        coupled = self.read_config.couple_encoder
        if self.read_config.h0 == "embeddings":
            self._install_embedding_hooks()
        for stack in self.adapted_stacks:
            for index, layer in enumerate(stack.layers):
                self._hooks.append(layer.register_forward_hook(functools.partial(self._on_layer_output, stack.name, index)))
            # The coupled decoder must back-propagate into the corrected encoder output it consumes.
            run_without_grad = not (coupled and stack.name == "decoder")
            self._wrap_stack(stack, side_dtype, run_without_grad)
        # The caller's 2D attention mask, for sequence context (an encoder stack itself may get only a 4D one).
        self._hooks.append(self.backbone.register_forward_pre_hook(self._pick_up_attention_mask, with_kwargs=True))
        self._hooks.append(self.backbone.register_forward_hook(self._drop_attention_mask, always_call=True))
        adapted = {s.name for s in self.adapted_stacks}
        if self.info.family == ENCODER_DECODER and adapted == {"encoder", "decoder"} and not coupled:
            self._hooks.append(self.backbone.register_forward_pre_hook(self._pick_up_encoder_states, with_kwargs=True))
            self._hooks.append(self.backbone.register_forward_hook(self._drop_encoder_states, always_call=True))

    def _keep_head_in_float32(self) -> None:
        """A bfloat16 / float16 backbone: the trained head stays float32 (AdamW on low-precision weights loses
        small updates), and the frozen LM head, which gets the float32 corrected state, computes in its own
        dtype and returns float32 logits for the loss."""
        for name in self.head_module_names:
            self._float32_head(self.backbone.get_submodule(name))
        try:
            lm_head = self.backbone.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            lm_head = None
        weight = getattr(lm_head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype in LOW_PRECISION and not weight.requires_grad:
            self._hooks.append(lm_head.register_forward_pre_hook(_cast_floating_inputs(weight.dtype), with_kwargs=True))
            self._hooks.append(lm_head.register_forward_hook(_float_output))

    def _float32_head(self, head: nn.Module) -> nn.Module:
        head.float()
        self._hooks.append(head.register_forward_pre_hook(_cast_floating_inputs(torch.float32), with_kwargs=True))
        return head

    def _wrap_stack(self, stack: Stack, side_dtype: torch.dtype, run_without_grad: bool) -> None:
        original = stack.module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self._replay is not None:
                capture, output = self._next_cached_call(stack, side_dtype)
                return self._apply_correction(stack, capture, output, kwargs)
            capture = _LayerCapture(stack.num_layers, side_dtype, self._capture_device)
            self._captures[stack.name] = capture
            try:
                with torch.no_grad() if run_without_grad else contextlib.nullcontext():
                    output = original(*args, **kwargs)
            finally:
                del self._captures[stack.name]
            if self._recorder is not None:
                return self._record(stack, capture, output)
            if self._shared_calls is not None:  # run_adapters: keep the states, unnormalised, for the others
                keep = self._positions or slice(None)  # correcting_positions: the other positions are never read
                pooled = None
                contexts = {c.sequence_context for c in self.adapter_configs.values()}
                if self._positions is not None and contexts & {"pooled", "segments"}:
                    final = _first_tensor(output)
                    # per text if any adapter compares texts (a "pooled" one takes the first of the three means)
                    separators = [c.separator_token_id for c in self.adapter_configs.values()
                                  if c.sequence_context == "segments"]
                    if len(set(separators)) > 1:
                        raise ConfigError("run_adapters: 'segments' adapters with different separator tokens "
                                          f"({sorted(set(separators))}) cannot share one backbone pass")
                    second = self._second_text(separators[0], final) if separators else None
                    pooled = pool_states(capture.states, self._token_mask(kwargs, final), self.read[stack.name].causal,
                                         second)  # before the states are cut
                    if second is None:
                        pooled = pooled[:, :, keep]  # a causal running mean has one row per position
                self._shared_calls.append(CachedCall(
                    stack.name, capture.states[:, :, keep].clone(), _first_tensor(output),
                    None if capture.embeddings is None else capture.embeddings[:, keep].clone(), pooled))
            return self._apply_correction(stack, capture, output, kwargs)

        stack.module.forward = forward
        self._wrapped.append(stack.module)

    # ---------------------------------------------------------------- hooks
    def _on_layer_output(self, stack_name: str, index: int, module, args, output) -> None:
        capture = self._captures.get(stack_name)
        if capture is not None:
            capture.add(index, _first_tensor(output))

    def _on_embeddings(self, stack_name: str, module, args, kwargs) -> None:
        capture = self._captures.get(stack_name)
        if capture is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            capture.embeddings = hidden.detach().to(device=capture.device or hidden.device, dtype=capture.dtype, copy=True)

    def _pick_up_attention_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._outer_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._outer_input_ids = input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None

    def _drop_attention_mask(self, module, args, output) -> None:
        self._outer_mask = None
        self._outer_input_ids = None

    def _second_text(self, separator_token_id: int, final: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the stack's positions in the second text ("segments" context), from the call's token ids."""
        input_ids = self._outer_input_ids
        if input_ids is None or tuple(input_ids.shape) != tuple(final.shape[:2]):
            raise ConfigError("READ's 'segments' sequence context finds the second text from the token ids: call "
                              "the model with input_ids (not inputs_embeds)")
        return second_text_mask(input_ids.to(final.device), separator_token_id)

    def _token_mask(self, kwargs, final: torch.Tensor) -> torch.Tensor | None:
        """(B, T) with 1 = real token, for sequence context: the stack's own 2D mask, else the caller's, else one
        recovered from the stack's 4D mask; None (every token real) when there is none."""
        batch, tokens = final.shape[:2]
        for mask in (kwargs.get("attention_mask"), self._outer_mask):
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == (batch, tokens):
                return mask
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == batch and mask.shape[-1] == tokens:
            keys = mask[:, 0, -1, :]  # an encoder's mask: every query row holds the same key mask
            return keys if keys.dtype == torch.bool else keys > torch.finfo(keys.dtype).min / 2
        return None

    def _pick_up_encoder_states(self, module, args, kwargs) -> None:
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            self._encoder_states = None  # the encoder runs inside this forward and sets them
        elif isinstance(encoder_outputs, dict) and READ_ENCODER_STATES in encoder_outputs:
            self._encoder_states = encoder_outputs[READ_ENCODER_STATES]
        else:
            raise IncompatibleAdapterError(
                "encoder_outputs were computed without READ; compute them with this ReadModel's encoder "
                "(model.get_encoder()) so that the encoder correction is included"
            )

    def _drop_encoder_states(self, module, args, output) -> None:
        self._encoder_states = None

    # ---------------------------------------------------------------- feature cache
    @contextlib.contextmanager
    def replaying(self, cached_calls):
        """Within this block, each adapted stack call takes the next of `cached_calls` (readapt.cache.CachedCall:
        stack name, layer states (N, B, T, d), final output (B, T, d), embedding output or None) instead of
        running its layers; the calls must be used up, in order, by the forward pass(es) inside the block."""
        queue = collections.deque(cached_calls)
        self._replay = queue
        try:
            yield
        finally:
            self._replay = None
        if queue:
            raise RuntimeError(f"{len(queue)} cached stack call(s) were left unused: the cache does not match "
                               "the forward pass that replayed it")

    @contextlib.contextmanager
    def recording(self, recorder):
        """Within this block, each adapted stack runs as usual and `recorder(stack_name, capture, final)` gets
        its states; no correction is applied (the cache stores what the backbone alone computes)."""
        self._recorder = recorder
        try:
            yield
        finally:
            self._recorder = None

    def _next_cached_call(self, stack: Stack, side_dtype: torch.dtype):
        if not self._replay:
            raise RuntimeError(f"the {stack.name} stack ran, but no cached call is left for it")
        call = self._replay.popleft()
        if call.stack != stack.name or call.states.shape[0] != stack.num_layers:
            raise RuntimeError(f"cached call for the {call.stack} stack ({call.states.shape[0]} layers) replayed "
                               f"into the {stack.name} stack ({stack.num_layers} layers)")
        if self.read_config.h0 == "embeddings" and call.embeddings is None:
            raise RuntimeError("READ h0='embeddings' needs the embedding output, which this cache does not hold")
        capture = _LayerCapture(stack.num_layers, side_dtype)
        capture.states = call.states.to(side_dtype)
        capture.embeddings = None if call.embeddings is None else call.embeddings.to(side_dtype)
        capture.pooled = None if call.pooled is None else call.pooled.to(side_dtype)
        capture.seen = stack.num_layers
        return capture, BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=call.final)

    def _record(self, stack: Stack, capture: _LayerCapture, output):
        if capture.seen != stack.num_layers:
            raise RuntimeError(f"READ saw {capture.seen} of {stack.num_layers} {stack.name} layers run")
        final = _first_tensor(output)
        self._recorder(stack.name, capture, final)
        if stack.name == "encoder" and self.info.family == ENCODER_DECODER and not isinstance(output, (tuple, list)):
            output[READ_ENCODER_STATES] = final  # lets a caller pass these encoder outputs back in, as usual
        return output

    def _apply_correction(self, stack: Stack, capture: _LayerCapture, output, kwargs):
        if capture.seen != stack.num_layers:
            raise RuntimeError(
                f"READ saw {capture.seen} of {stack.num_layers} {stack.name} layers run; "
                "the stack skipped layers or ran them outside its forward"
            )
        final = _first_tensor(output)
        encoder_states = encoder_mask = None
        if stack.name == "decoder" and self.info.family == ENCODER_DECODER:
            encoder_states = self._encoder_states if "encoder" in self.read and not self.read_config.couple_encoder else None
            if encoder_states is None:
                encoder_states = kwargs.get("encoder_hidden_states")
            if encoder_states is not None and encoder_states.dtype != capture.dtype:
                encoder_states = encoder_states.to(capture.dtype)  # a low-precision backbone's encoder output
            encoder_mask = kwargs.get("encoder_attention_mask")
            if encoder_mask is not None and encoder_mask.dim() != 2:
                encoder_mask = None  # an already expanded 4D mask: attend everywhere rather than guess its layout
            if encoder_states is not None and encoder_states.shape[0] != final.shape[0]:
                raise RuntimeError(f"READ encoder states have batch {encoder_states.shape[0]}, decoder has {final.shape[0]}")
        states, embeddings, pooled = capture.states, capture.embeddings, capture.pooled
        side_network = self.read[stack.name]
        token_mask = None
        if side_network.sequence_context != "none":
            if side_network.causal and _earlier_tokens_cached(kwargs, final.shape[1]):
                raise ConfigError("this READ adapter's sequence context (a running mean over the tokens) needs every "
                                  "earlier token in the same forward pass: call without a KV cache (use_cache=False)")
            token_mask = self._token_mask(kwargs, final)
        positions = self._positions
        # correcting_positions: the side networks see those positions only (states that run_adapters or the feature
        # cache kept are cut already: fewer positions than the final state, or all of them, which cutting again
        # leaves unchanged). The "pooled" context is taken over every real token first.
        if side_network.sequence_context == "segments" and pooled is None:  # pooled per text, over every real token
            if states.shape[2] != final.shape[1]:
                raise RuntimeError("READ got the states of some positions only, without their pooled context")
            pooled = pool_states(states, token_mask, False, self._second_text(side_network.separator_token_id, final))
        if positions is not None and states.shape[2] == final.shape[1]:
            if side_network.sequence_context == "pooled" and pooled is None:
                pooled = pool_states(states, token_mask, side_network.causal)[:, :, positions]
            states = states[:, :, positions].contiguous()
            embeddings = None if embeddings is None else embeddings[:, positions].contiguous()
        elif states.shape[2] != final.shape[1]:
            if positions is None:
                raise RuntimeError(f"READ got the states of {states.shape[2]} of {final.shape[1]} positions outside "
                                   "correcting_positions")
            if pooled is None and side_network.sequence_context in ("pooled", "segments"):
                raise RuntimeError("READ got the states of some positions only, without their pooled context")
        if self._capture_device is not None:  # a dispatched backbone: everything READ computes on one device
            side = self._capture_device
            states, embeddings, encoder_states, encoder_mask, token_mask, pooled = (
                None if t is None else t.to(side)
                for t in (states, embeddings, encoder_states, encoder_mask, token_mask, pooled))
        delta = side_network(states, embeddings, encoder_states, encoder_mask, token_mask, pooled)
        if delta.device != final.device:
            delta = delta.to(final.device)
        # In the wider of the two dtypes: a float32 correction is not rounded away on a bfloat16 backbone.
        merged = torch.promote_types(final.dtype, delta.dtype)
        if positions is None:
            corrected = final.to(merged) + delta.to(merged)
        else:
            corrected = final.to(merged, copy=True)
            corrected[:, positions] += delta.to(merged)

        if stack.name == "encoder" and self.info.family == ENCODER_DECODER:
            if not self.read_config.couple_encoder:
                self._encoder_states = corrected
                output[READ_ENCODER_STATES] = corrected
                return output
            corrected = corrected.to(final.dtype)  # the coupled backbone decoder consumes it
        if isinstance(output, (tuple, list)):
            return (corrected, *output[1:])
        output[next(iter(output.keys()))] = corrected
        return output

    # ---------------------------------------------------------------- several adapters
    @property
    def active_adapter(self) -> str:
        """The name of the adapter whose side networks and head run now."""
        return self._active

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return list(self._adapters)

    def list_adapters(self) -> list[str]:
        return self.adapters

    @property
    def adapter_configs(self) -> dict[str, ReadConfig]:
        """Each adapter's READ config (PEFT's `peft_config`)."""
        return {name: adapter.config for name, adapter in self._adapters.items()}

    def _adapter(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise ConfigError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters)}")
        return self._adapters[name]

    def load_adapter(self, adapter_directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a READ adapter saved with `save_pretrained` (or `readapt train`) next to the ones already loaded.
        It must come from a backbone like this one (same signature) and attach READ the same way (same stacks,
        same coupling, same head module names); its head may have another shape (another label set): it gets
        its own head modules. The active adapter does not change (use `set_adapter`)."""
        _check_adapter_name(adapter_name)
        if adapter_name in self._adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} is already loaded; delete it first or pick another name")
        adapter_directory = Path(adapter_directory)
        metadata = read_adapter_metadata(adapter_directory, method="read")
        check_backbone_compatible(metadata["backbone"], self.info.signature(), adapter_directory)
        try:
            config = ReadConfig.from_dict(metadata["config"])
        except ConfigError as exc:
            raise IncompatibleAdapterError(f"adapter {adapter_directory}: {exc}") from None
        self._check_same_attachment(config, metadata, adapter_directory)
        state = load_safetensors(adapter_directory / WEIGHTS_NAME)
        read = self._side_networks(config)
        heads = {name: self._head_for(name, state, adapter_directory) for name in self.head_module_names}
        _copy_into(self._adapter_tensors(read, heads), state, str(adapter_directory))
        if config.h0 == "embeddings":
            self._install_embedding_hooks()
        for module in (read, *heads.values()):
            module.requires_grad_(is_trainable)
        self._adapters[adapter_name] = _Adapter(config, read, heads, self._labels_for(heads, adapter_directory))

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that runs: its side networks and head modules go into the model."""
        adapter = self._adapter(adapter_name)
        if adapter_name == self._active:
            return
        self._adapters[self._active].labels = self._label_settings()
        self.read = adapter.read.to(next(self.read.parameters()).device)  # where the side networks live
        self.read_config = adapter.config
        for name, head in adapter.heads.items():
            current = next(self.backbone.get_submodule(name).parameters(), None)
            _set_submodule(self.backbone, name, head if current is None else head.to(current.device))
        self._apply_label_settings(adapter.labels)
        self._active = adapter_name
        for module in (adapter.read, *adapter.heads.values()):  # the mode train() gives them (the body's is unchanged)
            module.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget an adapter. Deleting the active one activates the first of the others; the last one stays."""
        self._adapter(adapter_name)
        if len(self._adapters) == 1:
            raise ConfigError(f"{adapter_name!r} is the only adapter of this model; it cannot be deleted")
        if adapter_name == self._active:
            self.set_adapter(next(name for name in self._adapters if name != adapter_name))
        del self._adapters[adapter_name]

    @contextlib.contextmanager
    def using_adapter(self, adapter_name: str):
        """Within this block `adapter_name` is active; the previously active adapter comes back afterwards."""
        previous = self._active
        self.set_adapter(adapter_name)
        try:
            yield self
        finally:
            if previous in self._adapters:
                self.set_adapter(previous)

    @contextlib.contextmanager
    def correcting_positions(self, positions: slice):
        """Within this block the side networks correct only the token positions `positions` (e.g. slice(0, 1):
        BERT's [CLS]); the other positions keep the backbone's state. The side network works per token, so for
        a head that reads only those positions (BERT-style classifiers read [CLS]; `head_reads_only` checks)
        the logits are those of the full correction, to float rounding (the RNN's matrix products run on fewer
        rows), at a fraction of the side networks' cost: on all-MiniLM-L6-v2 with r = 256 the side network
        costs a fifth to a third of a backbone pass when it runs over every token (benchmarks/predict.py). With the
        "pooled" and "segments" sequence contexts the pooled states are still taken over every real token. Not with the "mean"
        context (every position's correction needs every token's RNN summary). Single-stack (encoder-only / decoder-only) models
        only: a decoder side network attends over every corrected encoder position."""
        if len(self.adapted_stacks) != 1:
            raise ConfigError("correcting_positions works on single-stack (encoder-only / decoder-only) models only")
        with_context = sorted(name for name, config in self.adapter_configs.items() if config.sequence_context == "mean")
        if with_context:
            raise ConfigError(f"correcting_positions: adapter(s) {', '.join(with_context)} use the 'mean' sequence "
                              "context, so every position's correction depends on every token's RNN summary")
        if not isinstance(positions, slice):
            raise ConfigError(f"positions must be a slice, got {type(positions).__name__}")
        previous, self._positions = self._positions, positions
        try:
            yield self
        finally:
            self._positions = previous

    @torch.no_grad()
    def head_reads_only(self, positions: slice, **inputs) -> bool:
        """Whether the logits of `self(**inputs)` depend on the stack's final state at `positions` only: the
        state everywhere else is replaced with noise, and the logits must stay exactly the same."""
        if len(self.adapted_stacks) != 1:
            return False

        def scramble(module, args, output):
            hidden = _first_tensor(output)
            generator = torch.Generator(device=hidden.device).manual_seed(0)  # leaves the global RNG alone
            noisy = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype) * 10
            noisy[:, positions] = hidden[:, positions]
            if isinstance(output, (tuple, list)):
                return (noisy, *output[1:])
            output[next(iter(output.keys()))] = noisy
            return output

        reference = self(**inputs).logits
        handle = self.adapted_stacks[0].module.register_forward_hook(scramble)
        try:
            scrambled = self(**inputs).logits
        finally:
            handle.remove()
        return reference.shape == scrambled.shape and torch.equal(reference, scrambled)

    @torch.no_grad()
    def run_adapters(self, run: Callable[[], Any], adapter_names: Sequence[str] | None = None) -> dict[str, Any]:
        """{adapter: run()} for each adapter (default: all), running the frozen stacks only once.

        `run` is any inference computation with this model, e.g. `lambda: model(**inputs).logits` or a
        text-to-text candidate scoring that calls the encoder once and the model once per candidate; it must
        make the same stack calls each time. The first adapter runs live, and its stack calls' layer states are
        kept (before the in-place normalisation); every other adapter replays copies of them. An adapter gets
        exactly the side-network inputs it would get alone, so its result equals `run()` with it active, bit
        for bit on deterministic kernels. Only what follows the stacks (embeddings, pooler, head, LM head)
        runs once per adapter. Needs decoupled READ: a coupled backbone decoder consumes each adapter's own
        encoder correction. Outputs of the replayed adapters carry no per-layer hidden states / attentions."""
        names = list(self._adapters) if adapter_names is None else list(adapter_names)
        for name in names:
            self._adapter(name)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"run_adapters needs distinct adapter names, got {names}")
        if self.read_config.couple_encoder:
            raise ConfigError("run_adapters needs decoupled READ: with couple_encoder=True the backbone decoder "
                              "consumes each adapter's own encoder correction, so its states cannot be shared")
        outputs: dict[str, Any] = {}
        with self.using_adapter(names[0]):
            if len(names) == 1:
                return {names[0]: run()}
            calls: list[CachedCall] = []
            self._shared_calls = calls
            try:
                outputs[names[0]] = run()
            finally:
                self._shared_calls = None
            for position, name in enumerate(names[1:], start=2):
                self.set_adapter(name)
                # The last adapter may consume the kept states; the others normalise copies of them.
                with self.replaying(calls if position == len(names) else [_copy_call(c) for c in calls]):
                    outputs[name] = run()
        return outputs

    def forward_adapters(self, *args, adapter_names: Sequence[str] | None = None, **kwargs) -> dict[str, Any]:
        """{adapter: model(*args, **kwargs)} for each adapter (default: all), the frozen stacks run once."""
        return self.run_adapters(lambda: self(*args, **kwargs), adapter_names)

    def _check_same_attachment(self, config: ReadConfig, metadata: dict, directory: Path) -> None:
        """Adapters share this model's hooks: the same stacks, coupling and head module names."""
        try:
            stacks = [s.name for s in self._select_stacks(self.info, config)]
        except ConfigError as exc:
            raise IncompatibleAdapterError(f"adapter {directory}: {exc}") from None
        ours = [s.name for s in self.adapted_stacks]
        if stacks != ours:
            raise IncompatibleAdapterError(f"adapter {directory} adapts the {' + '.join(stacks)} stack(s); the adapters "
                                           f"of this model adapt {' + '.join(ours)}")
        if config.couple_encoder != self.read_config.couple_encoder:
            raise IncompatibleAdapterError(f"adapter {directory} has couple_encoder={config.couple_encoder}, the adapters "
                                           f"of this model couple_encoder={self.read_config.couple_encoder}")
        heads = list(metadata.get("head_modules") or [])
        if heads != self.head_module_names:
            raise IncompatibleAdapterError(f"adapter {directory} trains the head module(s) {heads}; the adapters of "
                                           f"this model train {self.head_module_names}")

    def _head_for(self, name: str, state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
        """A new instance of head module `name` for an adapter: a copy of the backbone's, with every Linear whose
        saved weight has another shape (another number of labels) replaced by a Linear of the saved shape."""
        current = self.backbone.get_submodule(name)
        head = copy.deepcopy(current)
        _clear_hooks(head)
        prefix = f"head.{name}."
        saved = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        for key, value in saved.items():
            expected = head.state_dict().get(key)
            if expected is None or expected.shape == value.shape:
                continue  # a missing tensor is reported when the weights are copied
            owner_name = key.rpartition(".")[0]
            owner = head.get_submodule(owner_name) if owner_name else head
            weight = saved.get(f"{owner_name}.weight" if owner_name else "weight")
            if not isinstance(owner, nn.Linear) or weight is None or weight.dim() != 2:
                raise IncompatibleAdapterError(
                    f"adapter {directory}: {prefix}{key} has shape {tuple(value.shape)} but this model's is "
                    f"{tuple(expected.shape)}, and only a Linear layer can be resized")
            resized = nn.Linear(weight.shape[1], weight.shape[0], bias=owner.bias is not None,
                                device=owner.weight.device, dtype=owner.weight.dtype)
            if owner_name:
                _set_submodule(head, owner_name, resized)
            else:
                head = resized
        if self.backbone_dtype in LOW_PRECISION:
            self._float32_head(head)
        return head

    def _adapter_tensors(self, read: nn.ModuleDict, heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        state = {f"read.{k}": v for k, v in read.state_dict().items()}
        for name, head in heads.items():
            state.update({f"head.{name}.{k}": v for k, v in head.state_dict().items()})
        return state

    def _label_settings(self) -> dict[str, Any]:
        """What a sequence-classification backbone's loss reads besides the head: its label count and problem
        type (config and model attribute), and the label names; saved and restored as adapters switch."""
        config = self.backbone.config
        return {"num_labels": self.backbone.__dict__.get("num_labels"), "id2label": getattr(config, "id2label", None),
                "label2id": getattr(config, "label2id", None), "problem_type": getattr(config, "problem_type", None)}

    def _apply_label_settings(self, settings: dict[str, Any]) -> None:
        if not settings:
            return
        config = self.backbone.config
        if settings["num_labels"] is not None:
            self.backbone.num_labels = settings["num_labels"]
        config.id2label, config.label2id = settings["id2label"], settings["label2id"]
        config.problem_type = settings["problem_type"]

    def _labels_for(self, heads: dict[str, nn.Module], directory: Path) -> dict[str, Any]:
        """The label settings of a loaded adapter: from its task file where it has one (`readapt train` writes
        it), else the output size of its head, with generic label names and the problem type left to infer."""
        settings = self._label_settings()
        if settings["num_labels"] is None:
            return settings  # not a sequence-classification model: nothing to switch
        from readapt.task_spec import task_labels

        names, regression = task_labels(directory)
        if regression is None:
            sizes = {m.out_features for head in heads.values() for m in head.modules() if isinstance(m, nn.Linear)}
            sizes.discard(self.info.stacks[-1].hidden_size)  # a pooler's or dense layer's output
            if len(sizes) != 1 or sizes == {settings["num_labels"]}:
                return settings  # the backbone's own label count (or no way to tell): keep its settings
            num_labels, problem = sizes.pop(), None
        else:
            num_labels = 1 if regression else len(names)
            problem = "regression" if regression else "single_label_classification"
        id2label = {i: names[i] if names else f"LABEL_{i}" for i in range(num_labels)}
        return {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                "problem_type": problem}

    # ---------------------------------------------------------------- nn.Module behaviour
    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if not (hasattr(self.backbone, "can_generate") and self.backbone.can_generate()):
            raise ConfigError(f"{self.info.architecture} cannot generate; generate() needs a seq2seq or causal LM backbone")
        if self.info.family == DECODER_ONLY and self.read_config.sequence_context != "none":
            # a running mean over the sequence needs every earlier token's summary at each step: recompute
            kwargs["use_cache"] = False
        return self.backbone.generate(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen body always runs as at inference (no dropout): the stacks, and what feeds them (BERT's
        # embedding dropout sits outside its encoder stack). Their outputs then depend only on the input,
        # which is what makes them cacheable and the backbone truly forward-only. The task head (and what
        # follows the body, e.g. the classifier's dropout) trains as usual.
        self.backbone.base_model.eval()
        for stack in self.info.stacks:
            stack.module.eval()
        for name in self.head_module_names:
            self.backbone.get_submodule(name).train(mode)
        return self

    # ---------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything READ trains: the side networks and the task head, nothing of the frozen backbone."""
        state = {f"read.{k}": v for k, v in self.read.state_dict().items()}
        for name in self.head_module_names:
            state.update({f"head.{name}.{k}": v for k, v in self.backbone.get_submodule(name).state_dict().items()})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        _copy_into(self.adapter_state_dict(), state, source)

    def adapter_metadata(self) -> dict:
        return {
            "method": "read",
            "readapt_version": __version__,
            "config": self.read_config.to_dict(),
            "backbone": self.info.signature(),
            "base_model_name_or_path": getattr(self.backbone.config, "_name_or_path", ""),
            "head_modules": self.head_module_names,
        }

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the READ config (JSON) and the trainable weights (safetensors), each atomically."""
        save_directory = Path(save_directory)
        atomic_save_safetensors(save_directory / WEIGHTS_NAME, self.adapter_state_dict(), metadata={"format": "pt"})
        atomic_write_json(save_directory / CONFIG_NAME, self.adapter_metadata())

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, adapter_directory: str | Path, is_trainable: bool = False,
                        adapter_name: str = DEFAULT_ADAPTER) -> ReadModel:
        adapter_directory = Path(adapter_directory)
        metadata = read_adapter_metadata(adapter_directory, method="read")
        check_backbone_compatible(metadata["backbone"], describe_backbone(backbone).signature(), adapter_directory)
        config = ReadConfig.from_dict(metadata["config"])
        model = cls(backbone, config, adapter_name=adapter_name)
        model.load_adapter_state_dict(load_safetensors(adapter_directory / WEIGHTS_NAME), source=str(adapter_directory))
        if not is_trainable:
            model.eval()
            model.requires_grad_(False)
        return model


def _copy_into(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into live ones, after checking that names and shapes match exactly."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise IncompatibleAdapterError(
            f"{source} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise IncompatibleAdapterError(
                f"{source}: {key} has shape {tuple(value.shape)} but this model needs {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an adapter name must be a non-empty string, got {name!r}")


def read_adapter_metadata(adapter_directory: Path, method: str | None = None) -> dict:
    """The JSON half of a saved adapter, checked for shape; `method` (if given) must be the one that wrote it."""
    adapter_directory = Path(adapter_directory)
    config_path = adapter_directory / CONFIG_NAME
    if not adapter_directory.is_dir():
        raise IncompatibleAdapterError(f"adapter directory {adapter_directory} does not exist")
    for path in (config_path, adapter_directory / WEIGHTS_NAME):
        if not path.is_file():
            pickles = sorted(p.name for p in adapter_directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and path.name == WEIGHTS_NAME:
                raise IncompatibleAdapterError(
                    f"{path} is missing and {adapter_directory} holds pickle weights ({', '.join(pickles)}), which "
                    "readapt never loads (unpickling can run arbitrary code); save the weights as safetensors")
            raise IncompatibleAdapterError(f"{path} is missing; is {adapter_directory} a readapt adapter?")
    try:
        metadata = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleAdapterError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("backbone"), dict) or "method" not in metadata:
        raise IncompatibleAdapterError(f"{config_path} is not a readapt adapter config")
    if method is not None and metadata["method"] != method:
        raise IncompatibleAdapterError(f"adapter {adapter_directory} was made by method {metadata['method']!r}, not {method!r}")
    if metadata["method"] == "read" and not isinstance(metadata.get("config"), dict):
        raise IncompatibleAdapterError(f"{config_path} has no READ config")
    return metadata


def _describe(signature: dict) -> str:
    stacks = " + ".join(f"{s['num_layers']} {name} layers of width {s['hidden_size']}" for name, s in signature["stacks"].items())
    return f"{signature['architecture']} ({signature['model_type']}, {stacks})"


def check_backbone_compatible(saved: dict, actual: dict, adapter_directory: Path) -> None:
    if saved != actual:
        raise IncompatibleAdapterError(
            f"adapter {adapter_directory} was trained on {_describe(saved)} but the backbone is {_describe(actual)}"
        )


def get_read_model(backbone: nn.Module, config: ReadConfig | None = None) -> ReadModel:
    """Freeze `backbone` and attach READ to it (in place, as PEFT does). Returns the ReadModel."""
    return ReadModel(backbone, config or ReadConfig())
