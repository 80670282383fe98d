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
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from readapt import __version__
from readapt.backbone import ENCODER_DECODER, BackboneInfo, Stack, describe_backbone
from readapt.config import ReadConfig
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from readapt.side_network import ReadSideNetwork

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
READ_ENCODER_STATES = "read_encoder_states"


class _LayerCapture:
    """One stack forward's layer outputs, copied into a single (N, B, T, d) buffer as they appear."""

    def __init__(self, num_layers: int, dtype: torch.dtype):
        self.num_layers = num_layers
        self.dtype = dtype
        self.states: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        self.seen = 0

    def add(self, index: int, hidden: torch.Tensor) -> None:
        if self.states is None:
            self.states = hidden.new_empty((self.num_layers, *hidden.shape), dtype=self.dtype)
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
            del module.forward
        self._wrapped.clear()
        return self.backbone


class ReadModel(FrozenBackboneWrapper):
    """A backbone with READ. Use `get_read_model(backbone, config)` or `ReadModel.from_pretrained`."""

    def __init__(self, backbone: nn.Module, config: ReadConfig):
        super().__init__()
        if not isinstance(config, ReadConfig):
            raise ConfigError(f"config must be a ReadConfig, got {type(config).__name__}")
        info = describe_backbone(backbone)
        self.backbone = backbone
        self.read_config = config
        self.info: BackboneInfo = info
        self.adapted_stacks = self._select_stacks(info, config)
        self.head_module_names = self._select_heads(backbone, info, config)

        backbone.requires_grad_(False)
        for name in self.head_module_names:
            backbone.get_submodule(name).requires_grad_(True)
        self.backbone_dtype = next(backbone.parameters()).dtype

        encoder_dim = None
        if info.family == ENCODER_DECODER and config.encoder_context:
            encoder_dim = info.stacks[0].hidden_size
        self.read = nn.ModuleDict({
            stack.name: ReadSideNetwork(stack.hidden_size, config, encoder_dim if stack.name == "decoder" else None)
            for stack in self.adapted_stacks
        })
        self.read.to(next(backbone.parameters()).device)

        self._captures: dict[str, _LayerCapture] = {}
        self._encoder_states: torch.Tensor | None = None
        self._replay: collections.deque | None = None  # cached stack calls still to feed (feature cache)
        self._recorder = None  # receives each stack's states while a feature cache is written
        self._hooks: list = []
        self._wrapped: list[nn.Module] = []
        self._install_hooks()
        if self.backbone_dtype in LOW_PRECISION:
            self._keep_head_in_float32()
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
        return list(names)

    def _install_hooks(self) -> None:
        side_dtype = next(self.read.parameters()).dtype
        coupled = self.read_config.couple_encoder
        for stack in self.adapted_stacks:
            for index, layer in enumerate(stack.layers):
                self._hooks.append(layer.register_forward_hook(functools.partial(self._on_layer_output, stack.name, index)))
            if self.read_config.h0 == "embeddings":
                self._hooks.append(stack.layers[0].register_forward_pre_hook(
                    functools.partial(self._on_embeddings, stack.name), with_kwargs=True))
            # The coupled decoder must back-propagate into the corrected encoder output it consumes.
            run_without_grad = not (coupled and stack.name == "decoder")
            self._wrap_stack(stack, side_dtype, run_without_grad)
        adapted = {s.name for s in self.adapted_stacks}
        if self.info.family == ENCODER_DECODER and adapted == {"encoder", "decoder"} and not coupled:
            self._hooks.append(self.backbone.register_forward_pre_hook(self._pick_up_encoder_states, with_kwargs=True))
            self._hooks.append(self.backbone.register_forward_hook(self._drop_encoder_states, always_call=True))

    def _keep_head_in_float32(self) -> None:
        """A bfloat16 / float16 backbone: the trained head stays float32 (AdamW on low-precision weights loses
        small updates), and the frozen LM head, which gets the float32 corrected state, computes in its own
        dtype and returns float32 logits for the loss."""
        for name in self.head_module_names:
            head = self.backbone.get_submodule(name).float()
            self._hooks.append(head.register_forward_pre_hook(_cast_floating_inputs(torch.float32), with_kwargs=True))
        try:
            lm_head = self.backbone.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            lm_head = None
        weight = getattr(lm_head, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype in LOW_PRECISION and not weight.requires_grad:
            self._hooks.append(lm_head.register_forward_pre_hook(_cast_floating_inputs(weight.dtype), with_kwargs=True))
            self._hooks.append(lm_head.register_forward_hook(_float_output))

    def _wrap_stack(self, stack: Stack, side_dtype: torch.dtype, run_without_grad: bool) -> None:
        original = stack.module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self._replay is not None:
                capture, output = self._next_cached_call(stack, side_dtype)
                return self._apply_correction(stack, capture, output, kwargs)
            capture = _LayerCapture(stack.num_layers, side_dtype)
            self._captures[stack.name] = capture
            try:
                with torch.no_grad() if run_without_grad else contextlib.nullcontext():
                    output = original(*args, **kwargs)
            finally:
                del self._captures[stack.name]
            if self._recorder is not None:
                return self._record(stack, capture, output)
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
            capture.embeddings = hidden.detach().to(capture.dtype, copy=True)

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
        delta = self.read[stack.name](capture.states, capture.embeddings, encoder_states, encoder_mask)
        # In the wider of the two dtypes: a float32 correction is not rounded away on a bfloat16 backbone.
        merged = torch.promote_types(final.dtype, delta.dtype)
        corrected = final.to(merged) + delta.to(merged)

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

    # ---------------------------------------------------------------- nn.Module behaviour
    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if not (hasattr(self.backbone, "can_generate") and self.backbone.can_generate()):
            raise ConfigError(f"{self.info.architecture} cannot generate; generate() needs a seq2seq or causal LM backbone")
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
        expected = self.adapter_state_dict()
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
    def from_pretrained(cls, backbone: nn.Module, adapter_directory: str | Path, is_trainable: bool = False) -> ReadModel:
        adapter_directory = Path(adapter_directory)
        metadata = read_adapter_metadata(adapter_directory, method="read")
        check_backbone_compatible(metadata["backbone"], describe_backbone(backbone).signature(), adapter_directory)
        config = ReadConfig.from_dict(metadata["config"])
        model = cls(backbone, config)
        model.load_adapter_state_dict(load_safetensors(adapter_directory / WEIGHTS_NAME), source=str(adapter_directory))
        if not is_trainable:
            model.eval()
            model.requires_grad_(False)
        return model


def read_adapter_metadata(adapter_directory: Path, method: str | None = None) -> dict:
    """The JSON half of a saved adapter, checked for shape; `method` (if given) must be the one that wrote it."""
    adapter_directory = Path(adapter_directory)
    config_path = adapter_directory / CONFIG_NAME
    if not adapter_directory.is_dir():
        raise IncompatibleAdapterError(f"adapter directory {adapter_directory} does not exist")
    for path in (config_path, adapter_directory / WEIGHTS_NAME):
        if not path.is_file():
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
