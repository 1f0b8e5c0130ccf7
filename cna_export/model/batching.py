"""``--batch-size auto``: the largest batch of prompts whose forward pass fits the device's memory.

A forward pass without a KV cache holds, per token, at most one layer's working set at a time
(``torch.inference_mode``): the residual stream and its normed copy, queries, keys, values and
the attention output (about 6 x hidden values), the MLP's gate, up, activation and product
(4 x intermediate values), and the attention scores (heads x prompt length values; the math
kernels materialise them). Temporaries double that. With ``logits`` the language-model head's
``vocab`` values per token are added (verification scores every position); with ``backward``
(gradient attribution) every layer's working set is kept for the backward pass; generation adds
its key/value cache (``cache``).

So a batch of ``B`` prompts padded to ``T`` tokens needs about::

    B x T x bytes x (2 x (6 hidden + 4 intermediate) + 2 heads x T [+ vocab]) [x layers when backward]

and the batch is the largest ``B`` (at most :data:`MAX_CPU` on a CPU, :data:`MAX_ACCELERATOR`
on a GPU, and at most the prompts left) that keeps this under ``share`` (default half) of the
memory available now: ``MemAvailable`` of ``/proc/meminfo`` for the CPU (or the process's
cgroup limit, when lower), ``torch.cuda.mem_get_info`` for a CUDA device. Prompts are batched
longest first, so each batch is sized for its own longest prompt: short prompts travel in large
batches, long ones in small batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

AUTO = "auto"
MAX_CPU = 64
"""Most prompts in one CPU batch: beyond this the matrix products are already large and the
progress reports would get coarse."""
MAX_ACCELERATOR = 512
SHARE = 0.5


@dataclass(frozen=True)
class MemoryModel:
    """Bytes a batch needs, as ``B x T x (per_token + per_token_per_position x T)``."""

    per_token: float
    per_token_per_position: float
    available: int
    limit: int

    def fits(self, width: int) -> int:
        """The largest batch of prompts padded to ``width`` tokens that fits (at least 1)."""
        need = max(1, width) * (self.per_token + self.per_token_per_position * max(1, width))
        return int(max(1, min(self.limit, self.available // max(need, 1.0))))


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            used = None
            for cur in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(Path(cur).read_text().strip())
                    break
                except (OSError, ValueError):
                    continue
            return max(0, int(text) - (used or 0))
    return None


def available_memory(device: Any) -> int:
    """Bytes free for activations on ``device`` now (CPU: available RAM, within the cgroup limit)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def memory_model(loaded: Any, logits: bool = False, backward: bool = False, share: float = SHARE,
                 available: int | None = None, cache: bool = False) -> MemoryModel:
    """The :class:`MemoryModel` of a forward pass of ``loaded`` on its input device (``cache``:
    generation, which also keeps every layer's keys and values, at most 2 x hidden values per token)."""
    import torch

    # from the config and the parameters, not the modules: a PEFT-wrapped model moves them
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or loaded.hidden_size)
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "moe_intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or max(1, hidden // 64))
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or 1)
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = elem * 2 * (6 * hidden + 4 * inter)
    per_position = elem * 2 * heads
    if logits:
        per_token += 4 * vocab  # the head's logits are float32 here
    if cache:
        per_token += elem * 2 * hidden * layers
    if backward:
        per_token *= layers
        per_position *= layers
    device = loaded.input_device
    kind = getattr(device, "type", str(device)).split(":")[0]
    free = available_memory(device) if available is None else available
    return MemoryModel(per_token, per_position, int(free * share), MAX_CPU if kind == "cpu" else MAX_ACCELERATOR)


def resolve_batch_size(batch_size: int | str, loaded: Any, logits: bool = False, backward: bool = False,
                       share: float = SHARE) -> int | Callable[[int], int]:
    """An int stays as it is; ``"auto"`` becomes the function width -> batch size of :class:`MemoryModel`."""
    if batch_size == AUTO:
        return memory_model(loaded, logits=logits, backward=backward, share=share).fits
    return int(batch_size)


def describe(batch_size: int | Callable[[int], int], sizes: list[int]) -> str:
    """The batch sizes used, for a log line: ``16`` or ``auto (64, 64, 23)``."""
    if not callable(batch_size):
        return str(batch_size)
    shown = ", ".join(str(s) for s in sizes[:6]) + (", ..." if len(sizes) > 6 else "")
    return f"auto ({shown})"
