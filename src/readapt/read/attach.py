"""How READ attaches to a frozen backbone without copying its code: forward hooks on each adapted stack's layers
copy every layer's output into one buffer (LayerCapture), and the stack's `forward` is wrapped so that it runs
without autograd and hands the buffer to the correction (ReadModel._apply_correction). Around a call the hooks
also pick up what the side networks need besides the states: the caller's attention mask and token ids
(sequence context), the corrected encoder output (an encoder-decoder's Joiner).

Feature cache (readapt.read.cache): inside `replaying(...)` a wrapped stack does not run its layers, it takes the
next cached call and goes straight to the correction; inside `recording(...)` it runs as usual and hands its
states to the cache writer instead of correcting them.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from readapt.backbone import ENCODER_DECODER, Stack
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.frozen import LOW_PRECISION, cast_floating_inputs, first_tensor, float_output
from readapt.read.capture import READ_ENCODER_STATES, LayerCapture
from readapt.read.side_network import second_text_mask


class StackAttachment:
    """ReadModel's hooks and stack wrappers (a mixin: the state it reads is set up by ReadModel.__init__)."""

    def _install_embedding_hooks(self) -> None:
        """Capture the embedding output (READ h0 = "embeddings"); installed once, when an adapter needs it."""
        if self._embedding_hooks:
            return
        for stack in self.adapted_stacks:
            self._hooks.append(stack.layers[0].register_forward_pre_hook(
                functools.partial(self._on_embeddings, stack.name), with_kwargs=True))
        self._embedding_hooks = True

    def _install_hooks(self) -> None:
        coupled = self.read_config.couple_encoder
        if self.read_config.h0 == "embeddings":
            self._install_embedding_hooks()
        for stack in self.adapted_stacks:
            for index, layer in enumerate(stack.layers):
                self._hooks.append(layer.register_forward_hook(functools.partial(self._on_layer_output, stack.name, index)))
            # The coupled decoder must back-propagate into the corrected encoder output it consumes.
            run_without_grad = not (coupled and stack.name == "decoder")
            self._wrap_stack(stack, run_without_grad)
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
            self._hooks.append(lm_head.register_forward_pre_hook(cast_floating_inputs(weight.dtype), with_kwargs=True))
            self._hooks.append(lm_head.register_forward_hook(float_output))

    def _float32_head(self, head: nn.Module) -> nn.Module:
        head.float()
        self._hooks.append(head.register_forward_pre_hook(cast_floating_inputs(torch.float32), with_kwargs=True))
        return head

    def _capture_dtype(self, stack: Stack) -> torch.dtype:
        """The dtype the (active adapter's) side network of `stack` computes in: the states are captured in it, so
        a low-precision side network gets the backbone's bfloat16 states without a float32 copy between."""
        network = self.read[stack.name]
        return network.compute_dtype_for(self.backbone_dtype, network.up_projection.weight.device)

    def _wrap_stack(self, stack: Stack, run_without_grad: bool) -> None:
        original = stack.module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            side_dtype = self._capture_dtype(stack)
            if self._replay is not None:
                capture, output = self._next_cached_call(stack, side_dtype)
                return self._apply_correction(stack, capture, output, kwargs)
            capture = LayerCapture(stack.num_layers, side_dtype, self._capture_device)
            self._captures[stack.name] = capture
            try:
                with torch.no_grad() if run_without_grad else contextlib.nullcontext():
                    output = original(*args, **kwargs)
            finally:
                del self._captures[stack.name]
            if self._recorder is not None:
                return self._record(stack, capture, output)
            if self._shared_calls is not None:  # run_adapters: the other adapters replay these states
                self._keep_for_other_adapters(stack, capture, output, kwargs)
            return self._apply_correction(stack, capture, output, kwargs)

        stack.module.forward = forward
        self._wrapped.append(stack.module)

    def _on_layer_output(self, stack_name: str, index: int, module, args, output) -> None:
        capture = self._captures.get(stack_name)
        if capture is not None:
            capture.add(index, first_tensor(output))

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

    @contextlib.contextmanager
    def replaying(self, cached_calls):
        """Within this block, each adapted stack call takes the next of `cached_calls` (readapt.read.cache.CachedCall:
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
        capture = LayerCapture(stack.num_layers, side_dtype)
        capture.states = call.states.to(side_dtype)
        capture.embeddings = None if call.embeddings is None else call.embeddings.to(side_dtype)
        capture.pooled = None if call.pooled is None else call.pooled.to(side_dtype)
        capture.seen = stack.num_layers
        return capture, BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=call.final)

    def _record(self, stack: Stack, capture: LayerCapture, output):
        if capture.seen != stack.num_layers:
            raise RuntimeError(f"READ saw {capture.seen} of {stack.num_layers} {stack.name} layers run")
        final = first_tensor(output)
        self._recorder(stack.name, capture, final)
        if stack.name == "encoder" and self.info.family == ENCODER_DECODER and not isinstance(output, (tuple, list)):
            output[READ_ENCODER_STATES] = final  # lets a caller pass these encoder outputs back in, as usual
        return output
