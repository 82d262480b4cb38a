"""Counting what a training step asks of the host: syncs, fresh host tensors, attention shapes.

A GPU runs ahead of the Python that feeds it until an operation needs a value back on the host
(``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing) or copies host data into a
kernel's input: then the CPU waits for every queued kernel. :class:`SyncCounter` is a
``TorchDispatchMode`` that sees every aten operation and counts those, on any device (on the CPU
they cost nothing, which is why they are counted rather than timed). It also records the key
length of every attention call, the shapes a compiled or graph-captured step must cover.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operations whose result needs a value on the host (a device sync on an accelerator).
SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t), .tolist()
    aten.item,
    aten.is_nonzero,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}
#: Tensors built from host values (``torch.tensor``): a blocking host-to-device copy on a GPU.
HOST_TENSOR_OPS = {aten.lift_fresh, aten.lift_fresh_copy}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_bool_index(args) -> bool:
    """Boolean-mask indexing: the kernel counts the mask's True entries on the host."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _is_cross_device_copy(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device) != args[0].device
    if func is aten.copy_.default:
        return args[0].device != args[1].device
    return False


class SyncCounter(TorchDispatchMode):
    """``with counter:`` counts, by kind, the host syncs of what runs inside (it may be entered
    many times; the counts add up). ``attention_lengths``: the distinct key lengths of the
    attention calls seen."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.ops = 0
        self.attention_lengths: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self.syncs[packet.__name__] += 1
        elif packet in HOST_TENSOR_OPS:
            self.syncs["host_tensor"] += 1
        elif packet in _INDEX_OPS and _has_bool_index(args):
            self.syncs[f"{packet.__name__}(bool mask)"] += 1
        elif _is_cross_device_copy(func, args, kwargs):
            self.syncs["cross_device_copy"] += 1
        name = packet.__name__
        if "scaled_dot_product" in name and not name.endswith("backward"):
            self.attention_lengths.add(int(args[1].shape[-2]))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def per_step(self, steps: int) -> dict[str, float]:
        """Each kind's count per step, and ``total``."""
        out = {kind: n / steps for kind, n in sorted(self.syncs.items())}
        out["total"] = self.total / steps
        return out


def attention_key_lengths(index, predictor_mode: str, grid_tokens: int | None = None) -> set[int]:
    """The key lengths of the attention calls a step with mask indices ``index`` (a
    :class:`~hjepa.models.hjepa.MaskIndices`) makes: the target encoder's ``grid_tokens`` (when
    given), the context encoder's ``Nc``, and per predictor pass ``Nc + Nt`` (``shared`` mode:
    also ``Nc``, the context rows')."""
    nc = index.context.shape[-1]
    lengths = {nc}
    if grid_tokens is not None:
        lengths.add(grid_tokens)
    for blocks in index.blocks:
        lengths.add(nc + blocks.shape[-1])
    return lengths
