"""Mixture-of-experts layers in transformers: the expert neurons' activations, for steering and capture.

transformers 5 keeps a MoE layer's routed experts as one module with 3-D parameters
(``gate_up_proj`` ``[experts, 2 * width, hidden]``, gate half first, and ``down_proj``
``[experts, hidden, width]``) and computes them with grouped or batched matrix products that
expose no per-expert hook point. :func:`intercept_experts` swaps in, for the duration of a block,
an equivalent forward: for each routed expert, the tokens routed to it, ``act(gate x) * up x``
(the module's own ``_apply_gate``), then ``interceptor(expert, activations, token_index,
routing_weight)`` (which may return scaled activations), the expert's down projection, the routing
weight, and the sum over the chosen experts, as transformers' eager path does. The expert neuron
``(e, j)`` is the ``j``-th input of expert ``e``'s down projection, so scaling it there is exactly
what scaling column ``j`` of ``down_proj[e]`` does.

The shared expert(s) are a plain gated MLP and are hooked like a dense MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..core.errors import CnaError

Interceptor = Callable[[int, Any, Any, Any], Any]
"""(expert, activations [tokens, width], token indices [tokens], routing weights [tokens]) -> activations."""


def check_experts(module: Any, layer: int) -> None:
    """Refuse an experts module this forward does not reproduce (biases, transposed or interleaved
    weights, post-expert norms, non-gated experts) with one line."""
    problems = [what for what, bad in (
        ("expert biases", getattr(module, "has_bias", False)),
        ("transposed expert weights", getattr(module, "is_transposed", False)),
        ("interleaved gate/up rows", not getattr(module, "is_concatenated", True)),
        ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
        ("non-gated experts", not getattr(module, "has_gate", True)),
    ) if bad]
    for attr in ("gate_up_proj", "down_proj"):
        w = getattr(module, attr, None)
        if w is None or getattr(w, "dim", lambda: 0)() != 3:
            problems.append(f"no 3-D {attr}")
    if problems:
        raise CnaError(f"not supported yet: the experts of layer {layer} ({type(module).__name__}) have "
                       + ", ".join(problems))


def experts_shape(module: Any) -> tuple[int, int, int]:
    """(experts, hidden, width) of a fused experts module."""
    e, h, w = module.down_proj.shape
    return int(e), int(h), int(w)


def _forward(module: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any, interceptor: Interceptor) -> Any:
    import torch
    from torch.nn import functional as F

    final = torch.zeros_like(hidden_states)
    n_experts = module.down_proj.shape[0]
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < n_experts:
            continue
        token_idx, k_pos = torch.where(top_k_index == e)
        x = hidden_states[token_idx]
        a = module._apply_gate(F.linear(x, module.gate_up_proj[e]))
        a = interceptor(int(e), a, token_idx, top_k_weights[token_idx, k_pos])
        out = F.linear(a, module.down_proj[e]) * top_k_weights[token_idx, k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@contextlib.contextmanager
def intercept_experts(modules: Mapping[int, Any], interceptor: Callable[[int], Interceptor]) -> Iterator[None]:
    """Run the experts modules ``{layer: module}`` with the per-expert forward above, calling
    ``interceptor(layer)`` between each expert's gate and down projection."""
    patched = []
    try:
        for layer, module in modules.items():
            check_experts(module, layer)
            fn = interceptor(layer)

            def forward(hidden_states: Any, top_k_index: Any, top_k_weights: Any, *args: Any,
                        _m: Any = module, _fn: Interceptor = fn, **kwargs: Any) -> Any:
                return _forward(_m, hidden_states, top_k_index, top_k_weights, _fn)

            module.forward = forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def scaler(groups: Mapping[int, tuple[list[int], list[float]]]) -> Interceptor:
    """An interceptor scaling expert ``e``'s inputs ``idx`` by ``ms`` (float32 product, one rounding)."""
    import torch

    tensors = {e: (torch.tensor(idx, dtype=torch.long), torch.tensor(ms, dtype=torch.float32))
               for e, (idx, ms) in groups.items()}

    def scale(expert: int, a: Any, token_idx: Any, weights: Any) -> Any:
        if expert not in tensors:
            return a
        idx, m = tensors[expert]
        idx = idx.to(a.device)
        a = a.clone()
        a[:, idx] = (a[:, idx].float() * m.to(a.device)).to(a.dtype)
        return a

    return scale
