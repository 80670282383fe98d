"""The READ side network: a small RNN that runs across the layers of one frozen transformer stack.

Shapes: N layers, B batch, T tokens, d backbone width, r = config.hidden_size.

    layer states φ_1..φ_N  (N, B, T, d)   frozen, no autograd history
      -> RMS-normalise each φ_i (parameter-free, in place: the states are ours and never needed raw again)
      -> optional input projection d -> r                      (Joiner)
      -> RNN over the layer axis, one sequence per token      (N, B*T, r)
         h0 = 0, or a projection of the embedding output φ_0,
         plus, on a decoder, attention context over the corrected encoder output (Joiner)
      -> aggregate over layers (mean or last)                  (B*T, r)
      -> optional sequence context, added to every token's summary (no extra parameters):
         "mean":   the mean summary of the sequence's real tokens                     (B, 1, r)
         "pooled": the same RNN's summary of the per-layer mean of the real tokens' raw
                   states (the sentence embedding of every layer), one more sequence   (B, 1, r)
         causal stacks (decoder-only) average over the real tokens up to and including each one (B, T, r)
      (or, "segments", before the RNN: every token's input at layer i gets W_c [m_i; a_i*b_i; |a_i-b_i|],
         m_i, a_i, b_i the RMS-normalised means of layer i's states over all real tokens, the first
         text's and the second text's (zero for one text): the RNN sees how the two texts compare)
      -> optional token mixer (ReadConfig.token_mixer_layers): pre-norm transformer encoder layers over the
         tokens' summaries, attention over the real tokens (causal stacks: the earlier ones), then LayerNorm (B, T, r)
      -> up-projection r -> d, zero-initialised, times `scaling` = δφ   (B, T, d)

"pooled" lets a head that reads one position (BERT's [CLS]) run the RNN on that position plus one pooled
sequence instead of every token, and lets the feature cache keep two vectors per layer and example ("segments":
the RNN on [CLS] alone, four vectors per layer).

The caller adds δφ to the stack's final hidden state. Because the up-projection starts at zero, an
untrained side network changes nothing, bit for bit.

Precision (ReadConfig.compute_dtype): the weights are float32, the optimizer's master copy. In low precision
(a bfloat16 backbone on a GPU, by default) the forward casts them all at once (one concatenation, one cast,
views: the GRU's weights form one contiguous chunk) and computes in that dtype; their gradients flow back
through the cast into the float32 weights. δφ is returned in float32, so that the caller adds it to φ_N in
float32 (a small correction is not rounded away).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from readapt.errors import ConfigError
from readapt.frozen import LOW_PRECISION
from readapt.read.config import ReadConfig, auto_hidden_size
from readapt.read.recompute import RecomputePolicy


class LayerwiseMLP(nn.Module):
    """The non-recurrent ablation (ReadConfig.rnn_type="mlp"): layer i's state goes through its own
    tanh(W_i x + b_i); nothing is carried from one layer to the next. Same call shape as nn.RNN."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0, *,
                 backbone_layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(backbone_layers, input_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(backbone_layers, 1, hidden_size))
        bound = input_size ** -0.5  # nn.Linear's default range
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        # x (N, S, in) -> (N, S, r); h0 has no meaning without recurrence and is ignored
        return torch.tanh(torch.baddbmm(self.bias, x, self.weight)), None


_RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN, "mlp": LayerwiseMLP}


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def rms_normalize_(x: torch.Tensor, eps: float) -> torch.Tensor:
    """In-place RMS normalisation of constant (no-grad) states; vector_norm avoids a squared copy."""
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).div_(x.shape[-1] ** 0.5)
    return x.div_(rms.square_().add_(eps).sqrt_())


def _rows(tensor: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[part]


def second_text_mask(input_ids: torch.Tensor, separator_token_id: int) -> torch.Tensor:
    """(B, T) bool: the positions after each row's first separator token (the second text of a pair; none for a
    single text). Padding is not excluded here (the token mask does that)."""
    separators = (input_ids == separator_token_id).to(torch.int32)
    return (separators.cumsum(-1) - separators) > 0


def second_text_start(input_ids: list[int], separator_token_id: int) -> int:
    """Where one example's second text starts (its length if it has none): `second_text_mask`'s rule, as one
    position per example for the feature cache, which stores unpadded examples."""
    return len(input_ids) - int(second_text_mask(torch.tensor([input_ids]), separator_token_id).sum())


@torch.no_grad()
def pool_states(layer_states: torch.Tensor, token_mask: torch.Tensor | None, causal: bool,
                second_text: torch.Tensor | None = None) -> torch.Tensor:
    """The per-layer mean of the real tokens' raw states, (N, B, 1, d); causal: the running mean up to each
    token, (N, B, T, d). `token_mask` (B, T), 1 = real token; None: every position is real. With `second_text`
    (B, T) bool (`second_text_mask`; not causal): (N, B, 3, d), the means over all real tokens, the first text's
    and the second text's (zero where a row has no second text)."""
    if token_mask is None:
        token_mask = layer_states.new_ones(layer_states.shape[1:3])
    if causal:
        weights = token_mask.to(layer_states.dtype)[None, :, :, None]  # (1, B, T, 1)
        weighted = layer_states if bool(token_mask.all()) else layer_states * weights
        return weighted.cumsum(2) / weights.cumsum(2).clamp(min=1)
    real = token_mask.to(torch.bool)
    masks = [real] if second_text is None else [real, real & ~second_text, real & second_text]
    # One masked matmul over the tokens, (1, B, M, T) @ (N, B, T, d): no weighted copy of the states
    weights = torch.stack(masks, dim=1).to(layer_states.dtype)  # (B, M, T)
    sums = torch.matmul(weights.unsqueeze(0), layer_states)  # (N, B, M, d)
    return sums / weights.sum(-1, keepdim=True).clamp(min=1)


class EncoderContext(nn.Module):
    """Joiner's cross-stack path: each decoder token attends (one head, width r) over the READ-corrected
    encoder output, so the encoder's correction reaches the decoder without entering the backbone."""

    def __init__(self, query_size: int, encoder_size: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.query = nn.Linear(query_size, hidden_size, bias=False)
        self.key_value = nn.Linear(encoder_size, 2 * hidden_size, bias=False)

    def forward(self, queries: torch.Tensor, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None):
        # queries (B, T, q), encoder_states (B, S, d_enc), encoder_mask (B, S) with 1 = real token.
        key, value = self.key_value(rms_normalize(encoder_states, self.eps)).chunk(2, dim=-1)
        mask = None if encoder_mask is None else encoder_mask[:, None, :].to(torch.bool)
        return F.scaled_dot_product_attention(self.query(queries), key, value, attn_mask=mask)


class TokenMixer(nn.Module):
    """Pre-norm transformer encoder layers (torch's own) over the tokens' side-network summaries in width r, then a
    LayerNorm: what lets READ's correction of one token (BERT's [CLS]) read the others' frozen states. Padding keys
    are masked; a causal stack's tokens attend to themselves and earlier tokens only. On a causal stack every
    position also attends to itself, so a padding query (left padding) never has an empty row (NaN) that could
    reach the rest. In training `token_mixer_key_dropout` hides random tokens as keys, per layer."""

    def __init__(self, width: int, config: ReadConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.heads = config.token_mixer_heads
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.token_mixer_heads, config.token_mixer_ffn_multiple * width,
                                       config.token_mixer_dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.token_mixer_layers))
        attention_dropout = config.token_mixer_attention_dropout
        for layer in self.layers if attention_dropout is not None else ():
            layer.self_attn.dropout = attention_dropout  # what MultiheadAttention passes as the SDPA dropout_p
        self.key_dropout = config.token_mixer_key_dropout
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, T, r); token_mask (B, T), 1 = real token, None: every position is real
        batch, tokens, _ = x.shape
        padding = None if token_mask is None or bool(token_mask.all()) else \
            ~token_mask.to(device=x.device, dtype=torch.bool)  # (B, T), True = padding
        dropping = self.training and self.key_dropout > 0
        if not self.causal:
            # A (B, T) key mask, which attention broadcasts over heads and queries (it stays on the fused kernel):
            # a real query always has a real key left (a row's first real token is never hidden), and a padding
            # query's output is read by nothing (padding is never a key)
            for layer in self.layers:
                hidden = padding
                if dropping:
                    hidden = self._dropped_keys(batch, tokens, x.device, token_mask)
                    hidden = hidden if padding is None else hidden | padding
                x = layer(x, src_key_padding_mask=hidden)
            return self.norm(x)
        allowed = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril().expand(batch, -1, -1)
        if padding is not None:
            allowed = allowed & ~padding[:, None, :]
        for layer in self.layers:
            mine = allowed & ~self._dropped_keys(batch, tokens, x.device, token_mask)[:, None, :] if dropping \
                else allowed
            mine = mine | torch.eye(tokens, dtype=torch.bool, device=x.device)  # a query always sees itself
            x = layer(x, src_mask=(~mine).repeat_interleave(self.heads, dim=0))  # (B * heads, T, T), True = blocked
        return self.norm(x)

    def _dropped_keys(self, batch: int, tokens: int, device, token_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T), True = hidden as a key in this layer; a row's first real token never is."""
        dropped = torch.rand(batch, tokens, device=device) < self.key_dropout
        first = 0 if token_mask is None else token_mask.to(device=device).int().argmax(dim=1)
        dropped[torch.arange(batch, device=device), first] = False
        return dropped


class _Correction(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, *args):
        return self.network._correction(*args)


class _InDtype:
    """`network._correction` computed in `dtype`: every weight cast at once (at construction: once per forward),
    swapped in for the call by torch.func.functional_call (which also keeps an nn.GRU's flat weight list in step).
    Called again by a chunk's recompute, it swaps in the same cast tensors."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        self.module = _Correction(network)
        names, weights = zip(*network.named_parameters(), strict=True)
        flat = torch.cat([w.reshape(-1) for w in weights]).to(dtype)
        views = flat.split([w.numel() for w in weights])
        self.weights = {f"network.{n}": v.view(w.shape) for n, v, w in zip(names, views, weights, strict=True)}

    def __call__(self, *args) -> torch.Tensor:
        try:
            return torch.func.functional_call(self.module, self.weights, args)
        finally:
            # functional_call puts the weights back by a path that leaves an RNN's flat weight list on the cast
            # copies (keeping their graph alive, and stale for a later call in another dtype): rebuild it
            for module in self.module.network.modules():
                if isinstance(module, nn.RNNBase):
                    module._init_flat_weights()


class ReadSideNetwork(nn.Module):
    def __init__(self, model_dim: int, config: ReadConfig, encoder_dim: int | None = None, causal: bool = False,
                 num_layers: int | None = None):
        """`encoder_dim` is given for the decoder stack of an encoder-decoder model with encoder context; `causal`
        for a stack whose tokens see only earlier ones (decoder-only): its sequence context is a running mean;
        `num_layers`, the stack's layer count, for the "mlp" ablation (one weight set per layer)."""
        super().__init__()
        self.causal = causal
        r = config.hidden_size or auto_hidden_size(model_dim)  # None: not resolved by ReadModel (a network built alone)
        self.eps = config.rms_norm_eps
        self.scaling = config.scaling
        self.aggregation = config.aggregation
        self.recompute_policy = RecomputePolicy(config.recompute, config.recompute_chunk_tokens)
        self.compute_dtype_setting = config.compute_dtype
        self.num_rnn_layers = config.num_rnn_layers
        self.model_dim, self.hidden_size, self.rnn_type = model_dim, r, config.rnn_type
        self.sequence_context = config.sequence_context
        self.separator_token_id = config.separator_token_id
        if causal and config.sequence_context == "segments":
            raise ConfigError("ReadConfig.sequence_context='segments' compares the two texts of the whole input, which a "
                              "decoder-only stack's tokens cannot see; use 'pooled' (a running mean) or 'none'")
        self.input_projection = nn.Linear(model_dim, r) if config.input_projection else None
        rnn_input = r if config.input_projection else model_dim
        # "segments": [m; a*b; |a-b|] per layer -> the RNN's input width (the input projection carries the bias)
        self.segments_projection = (nn.Linear(3 * model_dim, rnn_input, bias=False)
                                    if config.sequence_context == "segments" else None)
        self.h0_projection = nn.Linear(model_dim, r) if config.h0 == "embeddings" else None
        self.encoder_context = EncoderContext(rnn_input, encoder_dim, r, self.eps) if encoder_dim else None
        extra = {}
        if config.rnn_type == "mlp":
            if num_layers is None:
                raise ConfigError("ReadConfig.rnn_type='mlp' needs the stack's layer count (num_layers)")
            if encoder_dim:
                raise ConfigError("ReadConfig.rnn_type='mlp' carries no state, so the decoder's encoder context has "
                                  "nowhere to go; set encoder_context=False (or adapt the encoder stack only)")
            extra = {"backbone_layers": num_layers}
        self.rnn = _RNN_CLASSES[config.rnn_type](
            rnn_input, r, num_layers=config.num_rnn_layers,
            dropout=config.dropout if config.num_rnn_layers > 1 else 0.0, **extra,
        )
        # None ("auto", unresolved: a side network built without ReadModel) means none, as an unresolved "auto"
        # sequence context does
        self.token_mixer = TokenMixer(r, config, causal) if config.token_mixer_layers else None
        self.dropout = nn.Dropout(config.dropout)
        self.up_projection = nn.Linear(r, model_dim)
        nn.init.zeros_(self.up_projection.weight)
        nn.init.zeros_(self.up_projection.bias)

    def forward(
        self,
        layer_states: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        pooled_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return δφ (B, T, d). `layer_states` (N, B, T, d) is normalised in place (consumed). `token_mask`
        (B, T), 1 = real token, is what sequence context averages over and what the token mixer attends to (None:
        every position is real).
        `pooled_states` ("pooled" context; consumed too): `pool_states` of the whole sequence, for a caller that
        passes the states of some positions only (a head that reads [CLS]; the feature cache); else computed here.
        "segments" needs `pooled_states` (N, B, 3, d) from `pool_states(..., second_text=...)`: only the caller has
        the token ids that say where the second text starts."""
        master = self.up_projection.weight.dtype
        dtype = self.compute_dtype_for(layer_states.dtype, layer_states.device)
        if layer_states.dtype != dtype:  # states captured in another dtype (another adapter's, a cache)
            layer_states = layer_states.to(dtype)
        embeddings, encoder_states, pooled_states = (None if t is None else t.to(dtype)
                                                     for t in (embeddings, encoder_states, pooled_states))
        correction = self._correction if dtype == master else _InDtype(self, dtype)
        if self.sequence_context == "segments":
            if pooled_states is None or pooled_states.shape[2] != 3:
                raise RuntimeError("READ's 'segments' context needs the per-text pooled states (N, B, 3, d)")
            rms_normalize_(pooled_states, self.eps)
        elif self.sequence_context == "pooled":
            if pooled_states is None:
                pooled_states = pool_states(layer_states, token_mask, self.causal)
            elif not self.causal and pooled_states.shape[2] == 3:  # pooled per text (another adapter's): the mean
                pooled_states = pooled_states[:, :, :1]
            rms_normalize_(pooled_states, self.eps)
        else:
            pooled_states = None
        rms_normalize_(layer_states, self.eps)
        if embeddings is not None and self.h0_projection is not None:
            embeddings = rms_normalize_(embeddings, self.eps)
        mixer_mask = token_mask if self.token_mixer is not None else None
        if self.sequence_context != "mean":
            token_mask = None
        elif token_mask is None:
            token_mask = layer_states.new_ones(layer_states.shape[1:3])
        sequences = layer_states.shape[1] * layer_states.shape[2]  # one RNN sequence per token (and pooled row)
        if pooled_states is not None and self.sequence_context == "pooled":
            sequences += pooled_states.shape[1] * pooled_states.shape[2]
        # Whether to recompute (readapt.read.recompute): only a training call has activations to keep, and only
        # when they do not fit (recompute=None) or always (True). A call within one chunk (e.g. [CLS] alone) keeps
        # them at that bound anyway, so it would only run the RNN twice.
        plan = None
        if self.training and torch.is_grad_enabled():
            encoder_tokens = None if encoder_states is None else encoder_states.shape[1]
            per_token = self.activation_bytes_per_token(layer_states.shape[0], layer_states.shape[2], encoder_tokens,
                                                        dtype.itemsize)
            plan = self.recompute_policy.plan(sequences, per_token, layer_states.device)
        if plan is None or not plan.recompute:
            return correction(layer_states, embeddings, encoder_states, encoder_mask, token_mask, pooled_states,
                              mixer_mask).to(master)
        # Keep only the (already alive) inputs and rebuild the RNN activations during backward, a few
        # batch rows at a time: tokens are independent, so the activations alive at once stay bounded by
        # the chunk, whatever the batch size.
        # (Low precision: the weights are cast once, outside the chunks; each chunk's recompute reuses that cast.)
        rows = max(1, plan.chunk_tokens // layer_states.shape[2])
        deltas = []
        for start in range(0, layer_states.shape[1], rows):
            part = slice(start, start + rows)
            deltas.append(checkpoint(
                correction, layer_states[:, part], _rows(embeddings, part), _rows(encoder_states, part),
                _rows(encoder_mask, part), _rows(token_mask, part),
                None if pooled_states is None else pooled_states[:, part], _rows(mixer_mask, part), use_reentrant=False,
            ))
        return (torch.cat(deltas) if len(deltas) > 1 else deltas[0]).to(master)

    def compute_dtype_for(self, states_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype this side network computes in, for a backbone's states of `states_dtype` on `device`."""
        if self.compute_dtype_setting == "auto":
            low = states_dtype in LOW_PRECISION and device.type == "cuda"
            return states_dtype if low else self.up_projection.weight.dtype
        return getattr(torch, self.compute_dtype_setting)

    def activation_bytes_per_token(self, num_layers: int, tokens_per_row: int, encoder_tokens: int | None = None,
                                   element_size: int | None = None) -> int:
        """About what autograd keeps per token (RNN sequence) for backward when this side network runs without
        recompute, from its shapes: `num_layers` layer steps, rows of `tokens_per_row` tokens (the token mixer's
        attention grows with them), a decoder's `encoder_tokens` (encoder context). The per-step factors of the
        recurrent cells were counted on torch's CPU kernels with saved-tensor hooks (GRU about 8 r floats per layer
        step, the oneDNN LSTM 18 r, a plain RNN and the MLP ablation under 2 r); tests/test_recompute_policy.py
        checks that this estimate stays above what is saved and within 3 times of it."""
        n, d, r = num_layers, self.model_dim, self.hidden_size
        rnn_input = r if self.input_projection is not None else d
        floats = 0
        if self.token_mixer is not None or self.sequence_context == "pooled":
            floats += n * d  # the RNN's input is a copy (real tokens picked out, pooled rows appended), not a view
        if self.input_projection is not None:
            floats += n * rnn_input
        if self.segments_projection is not None:
            floats += n * rnn_input + 3 * d
        if self.dropout.p > 0:
            floats += 2 * n * rnn_input
        per_step = {"gru": 8, "lstm": 18, "rnn": 2, "mlp": 2}[self.rnn_type]
        floats += self.num_rnn_layers * (per_step + 1) * n * r
        floats += 4 * r  # aggregation, sequence context, dropout of the summary
        if self.h0_projection is not None:
            floats += d + r
        if self.encoder_context is not None and encoder_tokens:
            floats += 6 * r + 3 * encoder_tokens + d  # query, attention weights over the encoder tokens, output
        if self.token_mixer is not None:
            ffn = self.token_mixer.layers[0].linear1.out_features
            per_layer = 12 * r + 3 * ffn + 4 * self.token_mixer.heads * tokens_per_row  # attention weights, masks
            floats += len(self.token_mixer.layers) * per_layer + 2 * r
        floats += r + d  # the up-projection's input and output
        return floats * (element_size or self.up_projection.weight.element_size())

    def _correction(self, layer_states, embeddings, encoder_states, encoder_mask, token_mask=None,
                    pooled_states=None, mixer_mask=None) -> torch.Tensor:
        n_layers, batch, tokens, model_dim = layer_states.shape
        x = layer_states.view(n_layers, batch * tokens, model_dim)
        # With a token mixer, the RNN runs on the real tokens alone (padding would only cost time; the mixer never
        # attends to it); `real` None: on every position
        real = None
        if self.token_mixer is not None and mixer_mask is not None and self.encoder_context is None:
            real = mixer_mask.reshape(-1).to(torch.bool)
            real = None if bool(real.all()) else real
        if real is not None:
            x = x[:, real]
        token_rows = x.shape[1]
        segments = None
        if self.segments_projection is not None:
            segments, pooled_states = pooled_states, None
        if pooled_states is not None:  # "pooled": the pooled sequences run through the same RNN, after the tokens
            x = torch.cat([x, pooled_states.reshape(n_layers, -1, model_dim)], dim=1)
        if self.input_projection is not None:
            x = self.input_projection(x)
        if segments is not None:  # how the two texts compare, added to every token's input (N, B, 1, r)
            whole, first, second = segments.unbind(dim=2)
            compared = self.segments_projection(torch.cat([whole, first * second, (first - second).abs()], dim=-1))
            if real is None:
                x = (x.view(n_layers, batch, tokens, -1) + compared.unsqueeze(2)).view(n_layers, batch * tokens, -1)
            else:  # each real token gets its row's comparison
                x = x + compared[:, torch.arange(batch, device=x.device).repeat_interleave(tokens)[real]]
        x = self.dropout(x)

        h0 = None
        if self.h0_projection is not None:
            h0 = self.h0_projection(embeddings.reshape(batch * tokens, model_dim))
            h0 = h0 if real is None else h0[real]
        if self.encoder_context is not None and encoder_states is not None:
            # The decoder token's own top-layer state asks what it needs from the encoder.
            queries = x[-1, : batch * tokens].view(batch, tokens, -1)
            context = self.encoder_context(queries, encoder_states, encoder_mask).reshape(batch * tokens, -1)
            h0 = context if h0 is None else h0 + context
        if h0 is not None and pooled_states is not None:  # a pooled sequence starts from zeros
            h0 = torch.cat([h0, h0.new_zeros(x.shape[1] - token_rows, h0.shape[-1])])
        if h0 is not None:
            h0 = h0.unsqueeze(0).expand(self.num_rnn_layers, -1, -1).contiguous()
            if isinstance(self.rnn, nn.LSTM):
                h0 = (h0, torch.zeros_like(h0))

        outputs, _ = self.rnn(x, h0)  # (N, B*T [+ pooled sequences], r)
        summary = outputs.mean(dim=0) if self.aggregation == "mean" else outputs[-1]
        if real is not None:  # back to every position (zeros at padding), any pooled sequences after them
            unpacked = summary.new_zeros(batch * tokens, summary.shape[-1])
            unpacked[real] = summary[:token_rows]
            summary = torch.cat([unpacked, summary[token_rows:]])
        if pooled_states is not None:
            pooled = summary[batch * tokens:].view(batch, pooled_states.shape[2], -1)  # (B, 1 or T, r)
            summary = (summary[: batch * tokens].view(batch, tokens, -1) + pooled).view(batch * tokens, -1)
        if token_mask is not None:  # sequence context: what the input says, added to every token
            weights = token_mask.to(summary.dtype).view(batch, tokens, 1)
            per_token = summary.view(batch, tokens, -1)
            if self.causal:  # what the input says so far: nothing a token could not see in the backbone either
                context = (per_token * weights).cumsum(1) / weights.cumsum(1).clamp(min=1)
            else:
                context = (per_token * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
            summary = (per_token + context).view(batch * tokens, -1)
        if self.token_mixer is not None:  # every token's summary reads the others' (mixer_mask: the real tokens)
            summary = self.token_mixer(summary.view(batch, tokens, -1), mixer_mask).reshape(batch * tokens, -1)
        delta = self.up_projection(self.dropout(summary)) * self.scaling
        return delta.view(batch, tokens, model_dim)
