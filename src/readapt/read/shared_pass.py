"""Several READ adapters, one frozen pass: every adapter reads the same frozen states, so `run_adapters` runs the
stacks once and replays their states to each adapter; `correcting_positions` lets a head that reads one
position ([CLS]) have the side networks run on that position only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from readapt.errors import ConfigError
from readapt.frozen import first_tensor
from readapt.read.cache import CachedCall
from readapt.read.capture import copy_call
from readapt.read.side_network import pool_states


class SharedPass:
    """ReadModel's shared-pass API (a mixin over ReadModel's adapters and stack wrappers)."""

    @contextlib.contextmanager
    def correcting_positions(self, positions: slice):
        """Within this block the side networks correct only the token positions `positions` (e.g. slice(0, 1):
        BERT's [CLS]); the other positions keep the backbone's state. The side network works per token, so for
        a head that reads only those positions (BERT-style classifiers read [CLS]; `head_reads_only` checks)
        the logits are those of the full correction, to float rounding (the RNN's matrix products run on fewer
        rows), at a fraction of the side networks' cost: on all-MiniLM-L6-v2 with r = 256 the side network
        costs a fifth to a third of a backbone pass when it runs over every token (benchmarks/predict.py). With the
        "pooled" and "segments" sequence contexts the pooled states are still taken over every real token. Not with the "mean"
        context or a token mixer (every position's correction needs every token's RNN summary). Single-stack (encoder-only /
        decoder-only) models only: a decoder side network attends over every corrected encoder position."""
        if len(self.adapted_stacks) != 1:
            raise ConfigError("correcting_positions works on single-stack (encoder-only / decoder-only) models only")
        with_context = sorted(name for name, config in self.adapter_configs.items() if config.mixes_tokens)
        if with_context:
            raise ConfigError(f"correcting_positions: adapter(s) {', '.join(with_context)} use the 'mean' sequence "
                              "context or a token mixer, so every position's correction depends on every token's RNN "
                              "summary")
        if not isinstance(positions, slice):
            raise ConfigError(f"positions must be a slice, got {type(positions).__name__}")
        previous, self._positions = self._positions, positions
        try:
            yield self
        finally:
            self._positions = previous

    @torch.no_grad()
    def head_reads_only(self, positions: slice, **inputs) -> bool:
        """Whether the logits of `self(**inputs)` depend on the stack's final state at `positions` only (the state
        everywhere else is replaced with noise, and the logits must stay exactly the same), so that the active
        adapter's side networks may correct those positions alone: never when it mixes tokens (ReadConfig.mixes_tokens)."""
        if len(self.adapted_stacks) != 1 or self.read_config.mixes_tokens:
            return False

        def scramble(module, args, output):
            hidden = first_tensor(output)
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
        names = self.named_adapters.names if adapter_names is None else list(adapter_names)
        for name in names:
            self.named_adapters.get(name)
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
                with self.replaying(calls if position == len(names) else [copy_call(c) for c in calls]):
                    outputs[name] = run()
        return outputs

    def forward_adapters(self, *args, adapter_names: Sequence[str] | None = None, **kwargs) -> dict[str, Any]:
        """{adapter: model(*args, **kwargs)} for each adapter (default: all), the frozen stacks run once."""
        return self.run_adapters(lambda: self(*args, **kwargs), adapter_names)

    def _keep_for_other_adapters(self, stack, capture, output, kwargs) -> None:
        """Keep a live stack call's states, unnormalised, for the adapters that replay them (run_adapters)."""
        keep = self._positions or slice(None)  # correcting_positions: the other positions are never read
        pooled = None
        contexts = {c.sequence_context for c in self.adapter_configs.values()}
        if self._positions is not None and contexts & {"pooled", "segments"}:
            final = first_tensor(output)
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
            stack.name, capture.states[:, :, keep].clone(), first_tensor(output),
            None if capture.embeddings is None else capture.embeddings[:, keep].clone(), pooled))
