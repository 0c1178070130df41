"""Decode steps under CUDA graphs (transport local, CUDA): one graph per padded batch size (1, 2, 4,
..., up to max_num_seqs), captured once at start and replayed; prefill and mixed steps run eagerly.

A graph replays fixed kernels on fixed addresses, so each padded size has static inputs: one int64
device buffer (token ids, positions, cache slots, context lengths, block tables as wide as
max_model_len needs), which the step fills from one host-to-device copy of the table columns it
uses. A batch of b sequences runs in the smallest size n >= b; rows b..n-1 are padding: token 0 at
position 0, its latent written to a scratch KV block that no sequence owns, attending to that
block alone. The attention kernel's shape (its context splits) is fixed per graph by taking
max_model_len as the longest context; the rope tables are built for max_model_len before capture
and never move.

Without CUDA (`capture=False`) the same static buffers, padding and size choice run eagerly: that
is how the bookkeeping is tested on CPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cluster.engine.host_copy import HostToDevice

WARMUP_RUNS = 2  # eager runs before a capture: Triton compiles, cuBLAS and grouped GEMM pick kernels


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    sizes = []
    n = 1
    while n < max_num_seqs:
        sizes.append(n)
        n *= 2
    sizes.append(max_num_seqs)
    return tuple(sizes)


def padded_size(sizes: tuple[int, ...], batch: int) -> int | None:
    """The smallest captured size that holds `batch` rows (None: larger than every graph)."""
    return next((n for n in sizes if n >= batch), None)


@dataclass(frozen=True)
class DecodeSlots:
    """The static inputs of one padded size n, views of one device buffer [n * (4 + W)]."""

    packed: torch.Tensor  # [n * (4 + W)] int64
    input_ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [n]
    slot_mapping: torch.Tensor  # [n]
    context_lens: torch.Tensor  # [n]
    block_tables: torch.Tensor  # [n, W]

    @classmethod
    def of(cls, packed: torch.Tensor, n: int, width: int) -> DecodeSlots:
        ids, positions, slots, lens, tables = packed.split([n, n, n, n, n * width])
        return cls(packed, ids, positions, slots, lens, tables.view(n, width))


def pack_decode(out: torch.Tensor, n: int, width: int, token_ids: torch.Tensor, positions: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, scratch_block: int) -> None:
    """Writes a decode batch into `out` [n * (4 + W)] in `DecodeSlots`' layout: b = len(token_ids)
    real rows (token_ids, positions [b], block_tables [b, w <= W]), then padding rows on the
    scratch block."""
    b, w = block_tables.shape
    view = DecodeSlots.of(out, n, width)
    view.input_ids[:b] = token_ids
    view.positions[:b] = positions
    view.slot_mapping[:b] = block_tables[torch.arange(b), positions // block_size] * block_size \
        + positions % block_size
    view.context_lens[:b] = positions + 1
    view.block_tables[:b, :w] = block_tables
    view.block_tables[:b, w:] = 0  # never read: past every row's length
    view.input_ids[b:] = 0
    view.positions[b:] = 0
    view.slot_mapping[b:] = scratch_block * block_size
    view.context_lens[b:] = 1
    view.block_tables[b:] = 0
    view.block_tables[b:, 0] = scratch_block


DecodeForward = Callable[[DecodeSlots], torch.Tensor]  # static inputs -> logits [n, V]


class DecodeGraphs:
    """The graphs (or, with `capture=False`, their eager stand-ins) of every padded size."""

    def __init__(self, sizes: tuple[int, ...], max_model_len: int, block_size: int, scratch_block: int,
                 device: torch.device, forward: DecodeForward, capture: bool) -> None:
        self.sizes = sizes
        self.width = -(-max_model_len // block_size)  # block table entries of the longest sequence
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.forward = forward
        self.capture = capture
        self.copier = HostToDevice(device)
        self.slots = {n: DecodeSlots.of(torch.zeros(n * (4 + self.width), dtype=torch.long, device=device), n,
                                        self.width) for n in sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = {n: 0 for n in sizes}  # decode steps each size served
        if capture:
            self._capture_all()

    def fits(self, batch: int, table_width: int) -> bool:
        return padded_size(self.sizes, batch) is not None and table_width <= self.width

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """A decode batch (host tensors [b], [b], [b, w]) -> logits [b, V], by the graph of the
        smallest padded size that holds it. The logits are the graph's output buffer: read them
        before the next run."""
        b = token_ids.shape[0]
        n = padded_size(self.sizes, b)
        if n is None:
            raise ValueError(f"a decode batch of {b} exceeds the largest graph ({self.sizes[-1]})")
        slots = self.slots[n]
        # Only the columns this batch uses travel (a table as wide as max_model_len can be MBs); the
        # static table's columns past them keep older entries, which no row reads (past its length).
        width = block_tables.shape[1]
        host = self.copier.staging(n * (4 + width))
        pack_decode(host, n, width, token_ids, positions, block_tables, self.block_size, self.scratch_block)
        sent = DecodeSlots.of(self.copier.send(host), n, width)
        slots.packed[:4 * n].copy_(sent.packed[:4 * n])
        slots.block_tables[:, :width].copy_(sent.block_tables)
        self.replays[n] += 1
        if not self.capture:
            return self.forward(slots)[:b]
        graph, logits = self.graphs[n]
        graph.replay()
        return logits[:b]

    def _capture_all(self) -> None:
        """Largest first, all in one memory pool (a smaller graph's buffers fit the larger's)."""
        pool = None
        for n in reversed(self.sizes):
            slots = self.slots[n]
            empty = torch.zeros(0, dtype=torch.long)
            host = torch.zeros(slots.packed.numel(), dtype=torch.long)
            pack_decode(host, n, self.width, empty, empty, torch.zeros(0, 1, dtype=torch.long), self.block_size,
                        self.scratch_block)
            slots.packed.copy_(host)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.forward(slots)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(slots)
            pool = graph.pool()
            self.graphs[n] = (graph, logits)
        torch.cuda.synchronize()
