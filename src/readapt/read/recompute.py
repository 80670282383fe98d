"""When READ's side network recomputes its activations in backward, and in chunks of how many tokens.

ReadConfig.recompute=None ("auto", the default) decides per training call from the device's free memory: the side
network keeps its activations (one fused RNN call over every token, nothing run twice) when they fit into a share of
the free memory, and otherwise rebuilds them during backward a chunk of batch rows at a time, each chunk as large as
that share allows (or `recompute_chunk_tokens` when given). recompute=True always recomputes (chunks of
`recompute_chunk_tokens`, 256 when not given), recompute=False never does. Either way the gradients are the same:
tokens are independent in the RNN, and a token mixer's rows never leave their chunk.

The free memory is probed once, at the side network's first training call (CUDA: `torch.cuda.mem_get_info` plus what
torch's caching allocator holds unused; CPU: the available RAM, `psutil.virtual_memory().available`, or less where a
cgroup caps the process, divided among the data-parallel processes of this machine, which share that RAM); the
activation bytes per token come from the side network's shapes
(ReadSideNetwork.activation_bytes_per_token). The first decision is logged (logger "readapt"), as is any later one
that differs in kind; `summary()` is what metrics.json records (ReadModel.recompute_summary).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("readapt")

# Explicit recompute=True without recompute_chunk_tokens: the chunk of the fixed policy before "auto" existed.
DEFAULT_CHUNK_TOKENS = 256
# The share of the probed free memory that the side network's activations may take: the rest covers the gradients
# that backward creates alongside them, the task head's activations, the optimizer state created at the first step,
# allocator fragmentation and whatever else the process and its neighbours allocate meanwhile.
MEMORY_SHARE = 0.5


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2, else v1) still lets it allocate; None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes a huge number for "no limit"
            return max(0, int(limit) - usage)
    return None


def processes_sharing_ram() -> int:
    """Data-parallel processes on this machine (LOCAL_WORLD_SIZE, set by torchrun and Accelerate's launcher): each
    probes the same RAM, and each may fill its share at once."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def free_memory_bytes(device: torch.device) -> int | None:
    """What more the process can allocate on `device`: CUDA: free device memory plus the caching allocator's reserved
    but unused blocks; CPU: available RAM (within a cgroup's limit), this process's share of it when data-parallel
    processes run on the machine. None: a device this probe does not know."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        import psutil

        available = int(psutil.virtual_memory().available)
        room = _cgroup_room()
        return (available if room is None else min(available, room)) // processes_sharing_ram()
    return None


@dataclass(frozen=True)
class RecomputePlan:
    """One training call's choice: keep the activations (chunk_tokens None) or recompute in chunks of that many."""

    recompute: bool
    chunk_tokens: int | None
    reason: str

    @property
    def kind(self) -> str:
        return f"recompute in chunks of {self.chunk_tokens} tokens" if self.recompute else "keep activations"


class RecomputePolicy:
    """ReadConfig.recompute / recompute_chunk_tokens for one side network (`label`: its stack, for the log)."""

    def __init__(self, recompute: bool | None, chunk_tokens: int | None, label: str = "side network"):
        self.recompute = recompute
        self.chunk_tokens = chunk_tokens
        self.label = label
        self.free_bytes: int | None = None
        self.probed = False
        self.first: dict | None = None  # the first decision, with the figures it was made from
        self.counts: dict[str, int] = {}  # training calls per kind of decision
        self.largest_call_tokens = 0

    @property
    def mode(self) -> str:
        return "auto" if self.recompute is None else str(self.recompute).lower()

    def plan(self, sequences: int, bytes_per_token: int, device: torch.device) -> RecomputePlan:
        """The choice for a training call over `sequences` RNN sequences (tokens, pooled rows included) whose
        activations take about `bytes_per_token` each."""
        if self.recompute is False:
            plan = RecomputePlan(False, None, "recompute=False")
        elif self.recompute is True:
            chunk = self.chunk_tokens or DEFAULT_CHUNK_TOKENS
            plan = RecomputePlan(sequences > chunk, chunk if sequences > chunk else None,
                                 "recompute=True" if sequences > chunk else "recompute=True, the call fits one chunk")
        else:
            plan = self._auto(sequences, bytes_per_token, device)
        self._note(plan, sequences, bytes_per_token)
        return plan

    def _auto(self, sequences: int, bytes_per_token: int, device: torch.device) -> RecomputePlan:
        if not self.probed:
            self.free_bytes = free_memory_bytes(device)
            self.probed = True
        if self.free_bytes is None:  # a device without a probe: the bounded choice
            chunk = self.chunk_tokens or DEFAULT_CHUNK_TOKENS
            return RecomputePlan(sequences > chunk, chunk if sequences > chunk else None,
                                 f"no free-memory probe for {device.type}")
        budget = max(1, int(MEMORY_SHARE * self.free_bytes) // max(1, bytes_per_token))
        needed = sequences * bytes_per_token
        share = f"{needed / 2**20:,.1f} MiB of activations, {MEMORY_SHARE:.0%} of {self.free_bytes / 2**20:,.0f} MiB free"
        if sequences <= budget:
            return RecomputePlan(False, None, f"{share}: they fit")
        # Recompute in as few chunks as the budget allows, of equal size.
        chunk = self.chunk_tokens or math.ceil(sequences / math.ceil(sequences / budget))
        return RecomputePlan(True, chunk, f"{share}: they do not fit; {math.ceil(sequences / chunk)} chunks")

    def _note(self, plan: RecomputePlan, sequences: int, bytes_per_token: int) -> None:
        self.largest_call_tokens = max(self.largest_call_tokens, sequences)
        new_kind = plan.kind not in self.counts
        self.counts[plan.kind] = self.counts.get(plan.kind, 0) + 1
        if self.first is None:
            self.first = {"decision": plan.kind, "reason": plan.reason, "tokens": sequences,
                          "activation_bytes_per_token": bytes_per_token, "free_bytes": self.free_bytes,
                          "memory_share": MEMORY_SHARE if self.recompute is None else None}
            logger.info("READ %s, recompute=%s: %s (%d tokens; %s)", self.label, self.mode, plan.kind, sequences,
                        plan.reason)
        elif new_kind:
            logger.info("READ %s, recompute=%s: now %s (%d tokens; %s)", self.label, self.mode, plan.kind, sequences,
                        plan.reason)

    def summary(self) -> dict:
        """What metrics.json records: the setting, the first decision and what it was made from, calls per kind."""
        return {"recompute": self.mode, "recompute_chunk_tokens": self.chunk_tokens, "first": self.first,
                "training_calls": dict(self.counts), "largest_call_tokens": self.largest_call_tokens}
