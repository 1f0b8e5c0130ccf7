"""Capturing the neurons of mixture-of-experts layers at the captured prompt position.

An expert neuron ``(e, j)`` fires only on the tokens routed to expert ``e``, and its contribution
to the layer's output is scaled by the routing weight. Discovery therefore defines its per-prompt
activation at the captured token as **routing weight x activation** (``w_e(x) * a_{e,j}(x)``, the
amount the neuron actually contributes through ``down_proj[e]``) and **0 when the token is not
routed to ``e``**. The shared expert group is always computed and carries no routing weight: its
neurons are the plain inputs of its down projection (Qwen2-MoE's sigmoid gate on the shared
expert's *output* is not part of the activation). With ``mean-last-k`` capture these values are
averaged over the last ``k`` prompt tokens like dense activations.

Each MoE layer then yields one flat row per prompt (routed experts in order, then the shared group,
see :class:`cna_export.core.experts.Layout`), so scores, the universal-neuron filter and ranking work
unchanged. The share of prompts whose captured (last) token is routed to each expert is recorded
as the routing frequency.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ..core.experts import SHARED
from ..model.experts import intercept_experts


class ExpertCapture:
    """Installed by :class:`cna_export.discovery.capture.LastTokenCapture` on a MoE model: per MoE layer, an
    experts interceptor and a shared-expert pre-hook fill a ``[batch, positions, width]`` buffer, and a
    forward hook on the layer's MLP block pools it and hands it to the capture's sink."""

    def __init__(self, cap: Any, pool: Any):
        self.cap = cap
        self.pool = pool  # capture.pool (passed in: this module must not import capture, which imports it)
        self.loaded = cap.loaded
        self.layout = self.loaded.layout()
        self._stack = contextlib.ExitStack()
        self._buffers: dict[int, Any] = {}

    # -- buffers -------------------------------------------------------------------------------
    def _positions(self) -> tuple[int, int, int]:
        """(batch, sequence length, number of trailing positions kept)."""
        b, s = self.cap.mask.shape
        k = 1 if self.cap.capture == "last" else min(self.cap.k, s)
        return int(b), int(s), k

    def _buffer(self, layer: int, like: Any) -> Any:
        import torch

        if layer not in self._buffers:
            b, _, k = self._positions()
            self._buffers[layer] = torch.zeros(b, k, self.layout.width(layer), dtype=torch.float64)
        return self._buffers[layer]

    def _routed(self, layer: int):
        offsets = {e: self.layout.offset(layer, e) for e in range(self.layout.experts)}
        width = self.layout.expert_width

        def intercept(expert: int, a: Any, token_idx: Any, weights: Any) -> Any:
            if self.cap.sink is None or self.cap.mask is None:
                return a
            _, s, k = self._positions()
            buf = self._buffer(layer, a)
            row, pos = token_idx // s, token_idx % s
            keep = pos >= s - k
            if bool(keep.any()):
                vals = (a[keep].detach().double() * weights[keep].detach().double()[:, None]).cpu()
                off = offsets[expert]
                buf[row[keep].cpu(), (pos[keep] - (s - k)).cpu(), off:off + width] = vals
            hits = self.cap.routing.setdefault(layer, np.zeros(self.layout.experts))
            hits[expert] += int((pos == s - 1).sum())  # a token is routed to an expert at most once
            return a

        return intercept

    def _shared_hook(self, layer: int):
        off = self.layout.offset(layer, SHARED)

        def hook(module: Any, args: tuple) -> None:
            if self.cap.sink is None or self.cap.mask is None:
                return
            b, s, k = self._positions()
            x = args[0].detach().reshape(b, s, -1)[:, s - k:, :]
            buf = self._buffer(layer, x)
            buf[:, :, off:off + x.shape[-1]] = x.double().cpu()

        return hook

    def _flush_hook(self, layer: int):
        pool = self.pool

        def hook(module: Any, args: tuple, output: Any) -> None:
            buf = self._buffers.pop(layer, None)
            if self.cap.sink is None or self.cap.mask is None:
                return
            _, s, k = self._positions()
            if buf is None:
                buf = self._buffer(layer, None)
                self._buffers.pop(layer)
            mask = self.cap.mask[:, s - k:].to("cpu")
            pooled = pool(buf, mask, self.cap.capture, k).numpy()
            if pooled.shape[1] < self.cap.width:
                pooled = np.pad(pooled, ((0, 0), (0, self.cap.width - pooled.shape[1])))
            self.cap.sink(layer, pooled, self.cap.rows)

        return hook

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> ExpertCapture:
        arch, model = self.loaded.arch, self.loaded.model
        layers = sorted(self.layout.moe_layers)
        modules = {layer: arch.experts_module(model, layer) for layer in layers}
        self._stack.enter_context(intercept_experts(modules, self._routed))
        for layer in layers:
            shared = arch.shared_module(model, layer)
            if shared is not None:
                h = getattr(shared, arch.down_proj).register_forward_pre_hook(self._shared_hook(layer))
                self._stack.callback(h.remove)
            h = arch.mlp_module(model, layer).register_forward_hook(self._flush_hook(layer))
            self._stack.callback(h.remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._buffers.clear()
