"""ReadConfig: every knob of the READ side network, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from readapt.errors import ConfigError

# "mlp" is the non-recurrent ablation: a separate one-layer MLP per backbone layer instead of one shared RNN
# (no state carried across layers; N times the weights).
RNN_TYPES = ("gru", "lstm", "rnn", "mlp")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
AGGREGATIONS = ("mean", "last")
H0_MODES = ("zeros", "embeddings")
# "auto" (the default) is resolved when READ meets its backbone (ReadConfig.resolved_for): "segments" for encoder-only
# models with a known separator token, else "pooled" (both measured on all-MiniLM-L6-v2, docs/results/read-recipe-cpu/),
# "none" elsewhere: decoder-only models keep KV-cache generation and prompt-cache label scoring, and no T5 weights
# were available to measure it on.
SEQUENCE_CONTEXTS = ("auto", "none", "mean", "pooled", "segments")
STACK_NAMES = ("encoder", "decoder")
# token_mixer_layers=None ("auto"): AUTO_TOKEN_MIXER_LAYERS on an encoder-only backbone and on a decoder-only one
# with a sequence-classification head (ReadConfig.resolved_for); 0 elsewhere: a decoder-only LM keeps KV-cache
# generation and label-word scoring, and no T5 weights were available to measure it on. Two layers at r = 64 closed
# half of the gap to full fine-tuning that READ without it opened with data (docs/results/side-network-search/:
# all-MiniLM-L6-v2, GLUE, 400-8,000 SST-2 rows); on SmolLM2-135M with a classification head they are worth +13
# points on SST-2 at 1,000 rows at a third of the CPU, and equal within noise on MRPC (docs/results/comparison/).
AUTO_TOKEN_MIXER_LAYERS = 2
# hidden_size=None ("auto"): the backbone's width / 6, rounded up to a multiple of 32, within [64, 512]. On the
# 384-wide default backbone r = 64 matched r = 256 (docs/results/read-recipe-cpu/, ablation) and is the token
# mixer's measured width; the side network's FLOPs then stay a small share of the backbone's at every width.
AUTO_HIDDEN_DIVISOR, AUTO_HIDDEN_MULTIPLE, AUTO_HIDDEN_RANGE = 6, 32, (64, 512)
# Capacity that grows with data: trained on more than AUTO_LARGE_DATA_ROWS rows (ReadConfig.train_rows, which
# `readapt train` fills in), auto r is the width / AUTO_HIDDEN_DIVISOR_LARGE instead (256 on the 384-wide default
# backbone). On SST-2, 3 seeds, r = 256 against 64: +1.1 at 8,000 rows (83.7 vs 82.6) and +1.4 at 1,600, at ~3.3x
# the training CPU; at 8,000 rows 4 mixer layers or r = 128 gained nothing (4 mixer layers gained +1.6 at 1,600
# rows: the next rule to test; docs/results/read-capacity/). The threshold keeps
# small sets (where r = 64 matched r = 256) and the README's 3,600-row main job at the cheap width.
AUTO_LARGE_DATA_ROWS, AUTO_HIDDEN_DIVISOR_LARGE = 4000, 1.5


def auto_hidden_size(width: int, train_rows: int | None = None) -> int:
    """The side network's width r for a backbone `width` d wide when ReadConfig.hidden_size is None (auto), trained
    on `train_rows` rows (None: sized for small data)."""
    low, high = AUTO_HIDDEN_RANGE
    large = train_rows is not None and train_rows > AUTO_LARGE_DATA_ROWS
    divisor = AUTO_HIDDEN_DIVISOR_LARGE if large else AUTO_HIDDEN_DIVISOR
    return min(high, max(low, math.ceil(width / divisor / AUTO_HIDDEN_MULTIPLE) * AUTO_HIDDEN_MULTIPLE))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"ReadConfig.{name}={value!r} is invalid; allowed values: {', '.join(allowed)}")


@dataclass
class ReadConfig:
    """Configuration of READ (REcurrent ADaptation).

    One side network per adapted transformer stack: the frozen stack's per-layer outputs are
    RMS-normalised, optionally projected d -> hidden_size, fed to an RNN that runs across the layers
    (one sequence per token position), aggregated over layers, projected back to d (zero-initialised,
    so an untrained model computes exactly what the backbone computes) and added to the stack's final
    hidden state, scaled by ``scaling``.
    """

    # Every field's help text is in its metadata (PEFT-style); the CLI's READ flags are generated from it.
    hidden_size: int | None = field(default=None, metadata={
        "help": "the side network's width r (RNN hidden size); None: auto = the backbone width / 6 rounded up to a "
                "multiple of 32, within [64, 512] (64 on a 384-wide backbone, 128 on a 768-wide one); width / 1.5 "
                f"(256 and 512 on those) when train_rows > {AUTO_LARGE_DATA_ROWS}"})
    train_rows: int | None = field(default=None, metadata={
        "help": "how many training rows the auto settings are sized for (readapt train: the rows it trains on); "
                "None: small data"})
    rnn_type: str = field(default="gru", metadata={
        "help": "the recurrent cell across the layers; mlp = the non-recurrent ablation", "choices": RNN_TYPES})
    num_rnn_layers: int = field(default=1, metadata={"help": "stacked RNN layers"})
    input_projection: bool = field(default=True, metadata={
        "help": "project each layer's state d -> hidden_size before the RNN (fewer weights for wide backbones)"})
    aggregation: str = field(default="mean", metadata={
        "help": "how the RNN's outputs over the layer steps become one summary", "choices": AGGREGATIONS})
    scaling: float = field(default=1.0, metadata={"help": "the correction's scale alpha"})
    h0: str = field(default="zeros", metadata={
        "help": "the RNN's initial state: zeros, or a projection of the embedding output", "choices": H0_MODES})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the RNN's inputs and summary"})
    # Without sequence context ("none") each token is corrected from its own layer states only, and a head that
    # reads one position ([CLS], a decoder's last token) gets a correction computed from that position alone.
    # Both contexts add something about the whole input to every token's RNN summary, over the real tokens of
    # its sequence (padding excluded) that it can see: all of them in an encoder stack, itself and the ones
    # before it in a decoder-only stack (a running mean, so nothing leaks from later tokens). "mean": the mean of
    # those tokens' RNN summaries (the RNN runs over every token). "pooled": the same RNN run once more over the
    # per-layer mean of those tokens' raw states (every layer's sentence embedding), so a head that reads only
    # [CLS] needs the RNN on [CLS] and that one pooled sequence, and the feature cache replays two vectors per
    # layer. No extra parameters. Not for the decoder of an encoder-decoder model. Decoder-only generation then
    # recomputes the whole sequence at each new token (no KV cache): the running mean needs every earlier token.
    # "segments" (encoder stacks only): every token's RNN input at layer i also gets a projection of
    # [m_i; a_i * b_i; |a_i - b_i|], m_i the layer's mean over the real tokens, a_i and b_i the means over the
    # first text (up to and including the first separator token) and the second one (the rest; zero for a single
    # text), each RMS-normalised: what a sentence-pair task needs to compare its two texts. One more weight
    # matrix (3d x r); a [CLS]-reading head needs the RNN on [CLS] alone, and the cache replays [CLS] and three means per layer.
    sequence_context: str = field(default="auto", metadata={
        "help": "what every token's correction also sees of its sequence: segments = every layer's mean over the "
                "tokens and how the means of a pair's two texts compare, in the RNN's input; pooled = the RNN's "
                "summary of every layer's mean over the tokens (both let a [CLS] head and the feature cache work on "
                "[CLS] alone); mean = the mean of the tokens' RNN summaries; none = its own states only; auto = "
                "segments on encoders (pooled without a separator token), none elsewhere",
        "choices": SEQUENCE_CONTEXTS})
    # The token mixer: READ's per-token summaries (after the layer recurrence and the sequence context) go through
    # pre-norm transformer encoder layers over the tokens in the side width r (torch's nn.TransformerEncoderLayer:
    # attention over the sequence's real tokens, padding masked; causal on a decoder-only stack, so nothing leaks
    # from later tokens), then a LayerNorm, then the zero-initialised up-projection. Every token's correction (and
    # [CLS]'s, which a BERT-style head reads) then depends on every token's states, so the [CLS]-only shortcut
    # and the [CLS]-only feature-cache path are off: the side network runs on every token, and the cache replays
    # every token's layer states. Its weights do not depend on the backbone's depth. Not on the decoder of an
    # encoder-decoder model (its encoder stack may have one).
    token_mixer_layers: int | None = field(default=None, metadata={
        "help": "transformer encoder layers that mix the tokens' side-network summaries (attention over the real "
                "tokens in width hidden_size, after the layer recurrence; causal on decoder-only stacks); 0: none; "
                f"None: auto = {AUTO_TOKEN_MIXER_LAYERS} on encoder-only backbones and decoder-only sequence "
                "classifiers, 0 elsewhere"})
    token_mixer_heads: int = field(default=4, metadata={
        "help": "attention heads of the token mixer (they must divide hidden_size)"})
    token_mixer_ffn_multiple: int = field(default=2, metadata={
        "help": "the token mixer's feed-forward width, as a multiple of hidden_size"})
    token_mixer_dropout: float = field(default=0.1, metadata={
        "help": "dropout inside the token mixer's layers (feed-forward and residual branches; the attention weights "
                "too unless token_mixer_attention_dropout is set)"})
    token_mixer_attention_dropout: float | None = field(default=None, metadata={
        "help": "dropout on the token mixer's attention weights; None: token_mixer_dropout. 0 lets attention run "
                "fused (scaled_dot_product_attention without a dropout mask)"})
    token_mixer_key_dropout: float = field(default=0.0, metadata={
        "help": "in training, the chance that a token is hidden as a key from every query of one token-mixer layer "
                "(a fresh draw per layer; padding and the query itself stay as they are): a regulariser that keeps "
                "attention fused, unlike token_mixer_attention_dropout"})
    separator_token_id: int | None = field(default=None, metadata={
        "help": "the token that ends the first text ('segments' context); default: the backbone config's "
                "sep_token_id (readapt's loader sets it from the tokenizer)"})
    couple_encoder: bool = field(default=False, metadata={
        "help": "encoder-decoder ablation: the backbone decoder consumes the corrected encoder output, so gradients "
                "flow through the frozen decoder (more memory)"})
    encoder_context: bool = field(default=True, metadata={
        "help": "encoder-decoder: the decoder side network attends over the corrected encoder output (Joiner)"})
    stacks: list[str] | None = field(default=None, metadata={
        "help": "which stacks to adapt (encoder, decoder); None: every stack the backbone has whose correction "
                "reaches the output (not the encoder of a decoupled encoder-decoder without encoder_context)"})
    head_modules: list[str] | None = field(default=None, metadata={
        "help": "backbone modules trained alongside READ (task heads); None: detect newly added heads "
                "(classifier / score / ...); [] trains READ alone"})
    # recompute=None ("auto"; the string "auto" means the same): decided per training call from the device's free
    # memory (readapt.read.recompute): one fused RNN call over every token when the side network's activations fit,
    # else recomputed in backward in chunks as large as the memory allows. Not a property of the adapter: it changes
    # nothing but memory and time (the gradients are the same).
    recompute: bool | None = field(default=None, metadata={
        "help": "recompute the side network during backward instead of keeping its activations (bounds its "
                "activation memory to one chunk; costs a second forward of it); unset (None): auto = only when the "
                "device's free memory cannot hold its activations (probed at the first training step)"})
    recompute_chunk_tokens: int | None = field(default=None, metadata={
        "help": "tokens per recomputed chunk: bounds the side network's activation memory during backward; unset "
                "(None): auto = as many as the free memory allows (256 with recompute=True)"})
    compute_dtype: str = field(default="auto", metadata={
        "help": "the dtype the side network computes in; its weights stay float32 (the optimizer's master copy) and "
                "are cast once per forward. auto: the backbone's bfloat16/float16 on a GPU, else float32 (on the "
                "CPU low-precision matmuls are rarely faster)", "choices": COMPUTE_DTYPES})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of the RMS normalisation of the states"})
    method: str = field(default="read", init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("rnn_type", self.rnn_type, RNN_TYPES)
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("h0", self.h0, H0_MODES)
        _choice("sequence_context", self.sequence_context, SEQUENCE_CONTEXTS)
        for name in ("hidden_size", "num_rnn_layers", "recompute_chunk_tokens", "token_mixer_heads",
                     "token_mixer_ffn_multiple", "train_rows"):
            value = getattr(self, name)
            if name in ("hidden_size", "recompute_chunk_tokens", "train_rows") and value is None:
                continue  # auto: resolved against the backbone's width (resolved_for) / the free memory
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ReadConfig.{name}={value!r} is invalid; it must be an integer >= 1")
        layers = self.token_mixer_layers
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ConfigError(f"ReadConfig.token_mixer_layers={layers!r} is invalid; it must be an integer >= 0 "
                              "(0: no token mixer) or None (auto)")
        if layers and self.hidden_size is not None and self.hidden_size % self.token_mixer_heads:
            raise ConfigError(f"ReadConfig.token_mixer_heads={self.token_mixer_heads} does not divide hidden_size="
                              f"{self.hidden_size}: every attention head needs an equal share of the width")
        for name in ("token_mixer_dropout", "token_mixer_attention_dropout", "token_mixer_key_dropout"):
            value = getattr(self, name)
            if value is None and name == "token_mixer_attention_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"ReadConfig.{name}={value!r} is invalid; it must be a number in [0, 1)")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"ReadConfig.scaling={self.scaling!r} is invalid; it must be a finite number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ReadConfig.dropout={self.dropout!r} is invalid; it must be a number in [0, 1)")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise ConfigError(f"ReadConfig.rms_norm_eps={self.rms_norm_eps!r} is invalid; it must be > 0")
        if self.recompute == "auto":
            self.recompute = None
        if self.recompute is not None and not isinstance(self.recompute, bool):
            raise ConfigError(f"ReadConfig.recompute={self.recompute!r} is invalid; allowed values: true, false, "
                              "None or 'auto' (decided from the free memory)")
        for name in ("input_projection", "couple_encoder", "encoder_context"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ReadConfig.{name}={getattr(self, name)!r} is invalid; allowed values: true, false")
        if self.separator_token_id is not None and (isinstance(self.separator_token_id, bool)
                                                    or not isinstance(self.separator_token_id, int)
                                                    or self.separator_token_id < 0):
            raise ConfigError(f"ReadConfig.separator_token_id={self.separator_token_id!r} is invalid; it must be a "
                              "token id (an integer >= 0) or None")
        if self.rnn_type == "mlp" and (self.h0 != "zeros" or self.num_rnn_layers != 1):
            raise ConfigError("ReadConfig.rnn_type='mlp' (no recurrence) takes h0='zeros' and num_rnn_layers=1 only")
        if self.stacks is not None:
            if isinstance(self.stacks, str):
                self.stacks = [self.stacks]
            self.stacks = list(self.stacks)
            if not self.stacks:
                raise ConfigError("ReadConfig.stacks=[] is invalid; name at least one of: encoder, decoder (or None for all)")
            for stack in self.stacks:
                _choice("stacks", stack, STACK_NAMES)
        if self.head_modules is not None:
            if isinstance(self.head_modules, str) or not all(isinstance(m, str) for m in self.head_modules):
                raise ConfigError("ReadConfig.head_modules must be a list of module names or None")
            self.head_modules = list(self.head_modules)

    @property
    def mixes_tokens(self) -> bool:
        """Whether one token's correction depends on other tokens' RNN summaries (the "mean" context, a token
        mixer): the side network must then run on every token, never on [CLS] (or any position) alone."""
        return self.sequence_context == "mean" or bool(self.token_mixer_layers)

    def resolved_for(self, family: str, separator_token_id: int | None = None, width: int | None = None,
                     sequence_head: bool = False) -> ReadConfig:
        """This config with sequence_context="auto", token_mixer_layers=None and hidden_size=None replaced by what
        they mean for a backbone `family` (readapt.backbone: "encoder-only", "encoder-decoder", "decoder-only"),
        `width` (its hidden size d) and `sequence_head` (its head reads the whole sequence once, as a classifier
        does: it never continues a KV cache) and, for "segments", the separator filled in from
        `separator_token_id` (the backbone's) when not set; saved adapters hold the result."""
        config = self
        if config.hidden_size is None and width is not None:
            config = dataclasses.replace(config, hidden_size=auto_hidden_size(width, config.train_rows))
        if config.token_mixer_layers is None:
            mixes = family == "encoder-only" or (family == "decoder-only" and sequence_head)
            layers = AUTO_TOKEN_MIXER_LAYERS if mixes else 0
            config = dataclasses.replace(config, token_mixer_layers=layers)
        if config.separator_token_id is None and separator_token_id is not None:
            config = dataclasses.replace(config, separator_token_id=separator_token_id)
        if config.sequence_context == "auto":
            if family != "encoder-only":
                context = "none"
            else:
                context = "segments" if config.separator_token_id is not None else "pooled"
            config = dataclasses.replace(config, sequence_context=context)
        if config.sequence_context != "segments":
            config = dataclasses.replace(config, separator_token_id=self.separator_token_id)
        elif config.separator_token_id is None:
            raise ConfigError("ReadConfig.sequence_context='segments' needs the token that ends the first text: set "
                              "separator_token_id=tokenizer.sep_token_id (this backbone's config has no sep_token_id)")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadConfig:
        data = dict(data)
        saved = "method" in data  # to_dict's output (a saved adapter), not options given by a user
        method = data.pop("method", "read")
        if method != "read":
            raise ConfigError(f"adapter method {method!r} is not READ; load it with the matching method")
        if saved and "token_mixer_layers" not in data:
            data["token_mixer_layers"] = 0  # saved before the token mixer existed: that adapter has none
        if saved and "compute_dtype" not in data:
            data["compute_dtype"] = "float32"  # saved before compute_dtype existed: its side network ran in float32
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ReadConfig field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ReadConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
