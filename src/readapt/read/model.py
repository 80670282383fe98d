"""ReadModel: a frozen Hugging Face backbone with READ side networks attached to its stacks.

How the correction gets in, without copying any model code (readapt.read.attach): each adapted stack's
`forward` is wrapped so that the stack runs under `torch.no_grad()` while forward hooks on its layers copy
every layer's output into one buffer; after the stack returns, `_apply_correction` turns the buffer into δφ
with the side network and returns the stack output with `final hidden state + δφ`.

Encoder-decoder models are decoupled by default: the backbone decoder sees the untouched encoder output, and
the corrected encoder states reach the decoder side network (Joiner), attached to the encoder output under
READ_ENCODER_STATES so that `generate` carries and expands them together with the encoder output.

Low-precision backbones (bfloat16 / float16 weights): the side networks and the task head stay float32; the
correction is added in float32 and the corrected state stays float32 on its way to the head (the frozen LM
head of a text-to-text model gets it in its own dtype and returns float32 logits).

Named adapters (readapt.read.adapters) and the shared frozen pass over them (readapt.read.shared_pass) are
PEFT-style: `load_adapter`, `set_adapter`, `delete_adapter`, `run_adapters`. A ReadModel is a `peft.PeftModel` to
the Hugging Face stack (transformers' Trainer saves, resumes and inspects PEFT models by that class), with PEFT's
names implemented for READ in readapt.read.peft_surface and dtype / device moves in readapt.read.precision.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import torch
from torch import nn

from readapt.adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_backbone_compatible,
    copy_into,
    read_adapter_metadata,
)
from readapt.backbone import DECODER_ONLY, ENCODER_DECODER, BackboneInfo, Stack, describe_backbone
from readapt.errors import ConfigError
from readapt.frozen import LOW_PRECISION, FrozenBackboneWrapper, first_tensor
from readapt.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from readapt.offload import is_dispatched, side_network_device
from readapt.quantization import quantized_dtype
from readapt.read.adapter_switching import AdapterSwitching
from readapt.read.adapters import (
    DEFAULT_ADAPTER,
    NamedAdapter,
    NamedAdapters,
    frozen_copy,
    label_settings,
)
from readapt.read.attach import StackAttachment
from readapt.read.cache import CachedCall
from readapt.read.capture import READ_ENCODER_STATES, LayerCapture, earlier_tokens_cached
from readapt.read.config import ReadConfig
from readapt.read.peft_surface import (
    PeftSurface,
    as_peft_model,
    check_adapter_folder,
    refuse_compiled_backbone,
)
from readapt.read.precision import PrecisionPolicy
from readapt.read.shared_pass import SharedPass
from readapt.read.side_network import ReadSideNetwork, pool_states
from readapt.read.sources import backbone_source, separator_token_id
from readapt.version import __version__


class ReadModel(AdapterSwitching, PeftSurface, PrecisionPolicy, SharedPass, StackAttachment, FrozenBackboneWrapper):
    """A backbone with READ. Use `get_read_model(backbone, config)` or `ReadModel.from_pretrained`."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(as_peft_model(cls))  # a peft.PeftModel, with peft imported only now

    def __init__(self, backbone: nn.Module, config: ReadConfig, adapter_name: str = DEFAULT_ADAPTER):
        nn.Module.__init__(self)  # not PeftModel's, which builds one of PEFT's own tuners
        if not isinstance(config, ReadConfig):
            raise ConfigError(f"config must be a ReadConfig, got {type(config).__name__}")
        refuse_compiled_backbone(backbone)
        info = describe_backbone(backbone)
        # sequence_context="auto", and the separator token of "segments": the config's (readapt's loader copies the
        # tokenizer's into it), else the tokenizer's saved with the backbone, so a backbone loaded by hand gets the
        # READ model that `readapt train` builds on it
        config = config.resolved_for(info.family, separator_token_id(backbone, info.family, config),
                                     width=info.stacks[-1].hidden_size, sequence_head=info.sequence_head)
        self.backbone = backbone
        self.read_config = config
        self.info: BackboneInfo = info
        self.adapted_stacks = self._select_stacks(info, config)
        self.head_module_names = self._select_heads(backbone, info, config)
        # The backbone's own head modules, for disable_adapter() and the head a new adapter starts from (add_adapter)
        self._original_heads = {name: frozen_copy(backbone.get_submodule(name)) for name in self.head_module_names}
        self._original_labels = label_settings(backbone)
        self._adapters_disabled = False

        backbone.requires_grad_(False)
        for name in self.head_module_names:
            backbone.get_submodule(name).requires_grad_(True)
        if not hasattr(backbone, "accepts_loss_kwargs") and not info.architecture.endswith("ForCausalLM"):
            # Trainer takes a forward(**kwargs) for a loss normalised by num_items_in_batch and stops dividing by
            # the accumulation steps; only the causal LM losses (self.loss_function) are. Classification and
            # seq2seq heads average each micro-batch (transformers#47688), so they say they are not.
            backbone.accepts_loss_kwargs = False
        self.backbone_dtype = next(backbone.parameters()).dtype

        self.read = self._side_networks(config)
        # Dispatched backbone (readapt.offload): layer states are gathered on the side networks' device.
        self._capture_device = next(self.read.parameters()).device if is_dispatched(backbone) else None

        self._captures: dict[str, LayerCapture] = {}
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
        self._precision_hooks: list = []  # what _keep_head_in_float32 registered (redone when the dtype changes)
        if self.backbone_dtype in LOW_PRECISION:
            self._keep_heads_in_float32()
        heads = {name: backbone.get_submodule(name) for name in self.head_module_names}
        self.named_adapters = NamedAdapters(adapter_name, NamedAdapter(config, self.read, heads, {}))
        self.train(backbone.training)

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _select_stacks(info: BackboneInfo, config: ReadConfig) -> list[Stack]:
        available = {s.name: s for s in info.stacks}
        wanted = config.stacks or list(available)
        if config.stacks is None and ReadModel._encoder_correction_unread(info, config):
            wanted = ["decoder"]  # a side network on the encoder would compute what nothing reads
        for name in wanted:
            if name not in available:
                raise ConfigError(
                    f"ReadConfig.stacks names {name!r}, but this {info.family} model has only: {', '.join(available)}"
                )
        if config.sequence_context != "none" and "encoder" not in wanted and info.family != DECODER_ONLY:
            unread = (" (decoupled and without encoder_context, the encoder's correction would reach nothing, so it is "
                      "not adapted)" if config.stacks is None else "")
            raise ConfigError(f"ReadConfig.sequence_context={config.sequence_context!r} needs an adapted encoder stack "
                              f"or a decoder-only model; this {info.family} model adapts only: {', '.join(wanted)}"
                              + unread)
        if info.family == ENCODER_DECODER and wanted == ["encoder"] and not config.couple_encoder:
            raise ConfigError(
                "ReadConfig.stacks=['encoder'] on an encoder-decoder model needs couple_encoder=True: "
                "decoupled, an encoder correction reaches the output only through the decoder side network"
            )
        return [s for s in info.stacks if s.name in wanted]

    @staticmethod
    def _encoder_correction_unread(info: BackboneInfo, config: ReadConfig) -> bool:
        """An encoder-decoder model, decoupled (the backbone decoder reads the frozen encoder output) and without
        encoder context (the decoder side network does not read the corrected one): an encoder correction would
        reach nothing, so by default (stacks=None) only the decoder is adapted."""
        return info.family == ENCODER_DECODER and not config.couple_encoder and not config.encoder_context

    def _readable_state(self, state: dict[str, torch.Tensor], config: ReadConfig) -> dict[str, torch.Tensor]:
        """A saved adapter's tensors as this model loads them: adapters saved before an unread encoder side network
        was left out (stacks=None, decoupled, no encoder context) hold one, never trained (its zero up-projection
        got no gradient); it is dropped, which changes nothing the adapter computes."""
        if config.stacks is not None or not self._encoder_correction_unread(self.info, config):
            return state
        return {key: value for key, value in state.items() if not key.startswith("read.encoder.")}

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
        decoder_config = config if causal else dataclasses.replace(config, sequence_context="none", token_mixer_layers=0)
        read = nn.ModuleDict({
            stack.name: ReadSideNetwork(stack.hidden_size, decoder_config if stack.name == "decoder" else config,
                                        encoder_dim if stack.name == "decoder" else None, causal=causal,
                                        num_layers=stack.num_layers)
            for stack in self.adapted_stacks
        })
        for name, network in read.items():
            network.recompute_policy.label = f"{name} side network"
        # A backbone dispatched by Accelerate (split / offloaded): the device of the final hidden state.
        return read.to(side_network_device(self.backbone, self.adapted_stacks[-1].module))

    # ---------------------------------------------------------------- the correction
    def _apply_correction(self, stack: Stack, capture: LayerCapture, output, kwargs):
        """READ itself: the side network reads the frozen layer states φ_1..φ_N (captured or replayed, no autograd
        history) and its correction δφ is added to the stack's final hidden state φ_N. Everything after the
        stack (pooler, head, LM head, generation) is the backbone's own code."""
        if capture.seen != stack.num_layers:
            raise RuntimeError(f"READ saw {capture.seen} of {stack.num_layers} {stack.name} layers run; "
                               "the stack skipped layers or ran them outside its forward")
        if self._adapters_disabled:  # disable_adapter(): the backbone's own states
            return self._uncorrected(stack, output)
        final = first_tensor(output)  # φ_N
        delta = self.read[stack.name](*self._side_inputs(stack, capture, final, kwargs)).to(final.device)  # δφ
        # In the wider of the two dtypes: a float32 correction is not rounded away on a bfloat16 backbone.
        merged = torch.promote_types(final.dtype, delta.dtype)
        if self._positions is None:
            corrected = final.to(merged) + delta.to(merged)
        else:  # correcting_positions: the other positions keep the backbone's state
            corrected = final.to(merged, copy=True)
            corrected[:, self._positions] += delta.to(merged)
        return self._hand_on(stack, output, final, corrected)

    def _side_inputs(self, stack: Stack, capture: LayerCapture, final: torch.Tensor, kwargs) -> tuple:
        """The side network's inputs for one stack call: the layer states (cut to `correcting_positions`), the
        embedding output, the sequence context's token mask and pooled states, the Joiner's encoder states."""
        side_network = self.read[stack.name]
        states, embeddings, pooled = capture.states, capture.embeddings, capture.pooled
        token_mask = None
        if side_network.sequence_context != "none" or side_network.token_mixer is not None:
            if side_network.causal and earlier_tokens_cached(kwargs, final.shape[1]):
                raise ConfigError("this READ adapter's sequence context or token mixer (over the tokens) needs every "
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
        encoder_states, encoder_mask = self._encoder_inputs(stack, capture, final, kwargs)
        inputs = (states, embeddings, encoder_states, encoder_mask, token_mask, pooled)  # ReadSideNetwork.forward's order
        if self._capture_device is not None:  # a dispatched backbone: everything READ computes on one device
            inputs = tuple(None if t is None else t.to(self._capture_device) for t in inputs)
        return inputs

    def _encoder_inputs(self, stack: Stack, capture: LayerCapture, final: torch.Tensor, kwargs):
        """(encoder states, 2D encoder mask) for the decoder side network of an encoder-decoder model (Joiner)."""
        if stack.name != "decoder" or self.info.family != ENCODER_DECODER:
            return None, None
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
        return encoder_states, encoder_mask

    def _hand_on(self, stack: Stack, output, final: torch.Tensor, corrected: torch.Tensor):
        """The stack's output with the corrected state in it. A decoupled encoder's correction goes to the decoder
        side network only (the backbone decoder keeps reading the frozen encoder output)."""
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

    def _uncorrected(self, stack: Stack, output):
        """A stack's output as the backbone computed it. A decoupled encoder's output also carries its states where
        READ's would be, so that generate() can hand it back to the backbone (as a recorded cache pass does)."""
        if (stack.name == "encoder" and self.info.family == ENCODER_DECODER and not self.read_config.couple_encoder
                and not isinstance(output, (tuple, list))):
            output[READ_ENCODER_STATES] = first_tensor(output)
        return output

    def _adapter_tensors(self, read: nn.ModuleDict, heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        state = {f"read.{k}": v for k, v in read.state_dict().items()}
        for name, head in heads.items():
            state.update({f"head.{name}.{k}": v for k, v in head.state_dict().items()})
        return state

    # ---------------------------------------------------------------- nn.Module behaviour
    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if not (hasattr(self.backbone, "can_generate") and self.backbone.can_generate()):
            raise ConfigError(f"{self.info.architecture} cannot generate; generate() needs a seq2seq or causal LM backbone")
        if self.info.family == DECODER_ONLY and (self.read_config.sequence_context != "none"
                                                 or self.read_config.token_mixer_layers):
            # a running mean (a token mixer) over the sequence needs every earlier token at each step: recompute
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

    def recompute_summary(self) -> dict[str, dict]:
        """Per adapted stack, what the active adapter's side network chose about recomputing its activations in
        backward (readapt.read.recompute): the setting, the first training call's decision and the figures it came
        from, and the training calls per kind of decision. metrics.json records it."""
        return {name: network.recompute_policy.summary() for name, network in self.read.items()}

    # ---------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- save / load
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Everything READ trains: the side networks and the task head, nothing of the frozen backbone (of the
        active adapter, or of `adapter_name`)."""
        adapter = self.named_adapters.get(self.named_adapters.active if adapter_name is None else adapter_name)
        return self._adapter_tensors(adapter.read, adapter.heads)  # the active one's are the model's own modules

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        copy_into(self.adapter_state_dict(), self._readable_state(state, self.read_config), source)

    def adapter_metadata(self, adapter_name: str | None = None) -> dict:
        """adapter_config.json: the READ config, and what rebuilds the backbone (AutoReadModel) and checks it."""
        name = self.named_adapters.active if adapter_name is None else adapter_name
        adapter = self.named_adapters.get(name)
        labels = adapter.labels
        if name == self.named_adapters.active:  # the live settings (the saved ones while disable_adapter() runs)
            labels = self._enabled_labels if self._adapters_disabled else label_settings(self.backbone)
        return {
            "method": "read",
            "readapt_version": __version__,
            "config": adapter.config.to_dict(),
            "backbone": self.info.signature(),
            "base_model_name_or_path": backbone_source(self.backbone),
            # a quantized backbone's storage dtype ("int8" / "int4"; its weights report the float dtype they compute
            # in), so that AutoReadModel loads it quantized again
            "backbone_dtype": quantized_dtype(self.backbone) or str(self.backbone_dtype).removeprefix("torch."),
            "head_modules": self.head_module_names,
            "labels": {key: value for key, value in labels.items() if value is not None},
        }

    def _write_adapter(self, directory: Path, adapter_name: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """One adapter's folder: the trainable weights (safetensors) and the metadata (JSON), each atomically."""
        tensors = self.adapter_state_dict(adapter_name) if state is None else state
        atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        atomic_write_json(directory / CONFIG_NAME, self.adapter_metadata(adapter_name))

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, adapter_directory: str | Path, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False) -> ReadModel:
        """The adapter saved in `adapter_directory` on `backbone` (PEFT's argument order). Adapters saved next to
        it in sub-folders (save_pretrained's layout for non-default names) load with `load_adapter`."""
        adapter_directory = Path(adapter_directory)
        check_adapter_folder(adapter_directory)
        metadata = read_adapter_metadata(adapter_directory, method="read")
        check_backbone_compatible(metadata["backbone"], describe_backbone(backbone).signature(), adapter_directory)
        config = ReadConfig.from_dict(metadata["config"])
        model = cls(backbone, config, adapter_name=adapter_name)
        model.load_adapter_state_dict(load_safetensors(adapter_directory / WEIGHTS_NAME), source=str(adapter_directory))
        if not is_trainable:
            model.eval()
            model.requires_grad_(False)
        return model


def get_read_model(backbone: nn.Module, config: ReadConfig | None = None) -> ReadModel:
    """Freeze `backbone` and attach READ to it (in place, as PEFT does). Returns the ReadModel."""
    return ReadModel(backbone, config or ReadConfig())
