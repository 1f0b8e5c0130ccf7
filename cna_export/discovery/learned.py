"""Learned per-neuron multipliers (``multiplier_mode: learned``).

The support is the circuit :func:`cna_export.discovery.cna.select` picked (the top neurons by the
chosen score); this module fits one scalar ``m_j`` per support neuron (every other neuron stays at 1)
by gradient descent through hooks on the ``down_proj`` input, the activation the circuit scales:

    J(m) = mean_pos softplus(s B(m))  +  λ mean_benign KL_T(m)  +  μ mean_neg max(0, -s (B(m) - B(1)))²
           +  l1 Σ_j |m_j - 1|

* ``B``: the attribution score's behaviour score (:func:`cna_export.discovery.scores.behaviour_score`),
  the refusal-minus-compliance opening log-probability gap of the first answer token, on the positive
  prompts. ``s = +1`` lowers it (``learn_goal: suppress``, refusal removal), ``s = -1`` raises it
  (``increase``, hardening). ``softplus(s B) = -log σ(-s B)`` is the log-loss of the wanted opening
  beating the other: it is flat once the gap has turned, so the KL term then decides.
* ``KL_T``: ``KL(unsteered || steered)`` of the next-token distributions over the first ``T =
  learn_kl_tokens`` positions of the unsteered model's own greedy answer (teacher-forced), averaged per
  prompt, over the negative and neutral prompts: the drift the edit causes where it should change nothing.
* ``μ = learn_benign_weight`` (default 0: off): the same gap ``B`` on the negative prompts only (the benign
  twins, not the neutral ones), against ``B(1)``, the unsteered model's gap on that prompt (computed once,
  like the KL reference). ``-s`` penalises moving a twin in the goal's direction: for ``increase`` a rising
  refusal gap (over-refusal), for ``suppress`` a falling one. A squared hinge: 0 at no change and for any move
  the other way (which it neither rewards nor penalises), quadratic in the move in the penalised direction,
  so, like the KL, it only acts once a twin has started to move the wrong way. The KL sees every position
  of every benign answer; this term sees only the opening decision on the twins, which is what over-refusal
  (or, when suppressing, the loss of a twin's own refusal) is made of. It is recorded whatever ``μ`` (the
  objective's ``benign``), so the twins' move shows even when it is not penalised.
* ``l1``: an L1 penalty on ``m - 1``, applied as the proximal step of Adam (soft-thresholding ``m - 1``
  by ``lr l1 / (sqrt(v̂) + eps)``, Adam's own per-neuron step scale), so a neuron the objective does not
  need sits exactly at 1 and the export leaves it untouched.

Only the recipe's prompts are used (never an evaluation set). The prompts are cut once into fixed batches
(longest first); each step draws one positive and one benign batch in a seeded order (``learn_seed``), and,
when ``μ > 0``, one batch of the negative prompts (its order drawn after the others, so ``μ = 0`` draws
exactly what it drew before the term existed). The unsteered log-probabilities of each benign batch are
computed once, with the same padding, and kept in float16; the unsteered gaps ``B(1)`` of the negative prompts
in float32. The optimisation starts from the circuit's multipliers (``multiplier``) or 1.

The result is one scalar per neuron, so every export format folds it exactly. The circuit records, under
``method.learned``: the settings, the seconds spent (answers and references, steps, the objective on the
whole training set before and after), and the neurons changed (``|m - 1| > 0.01``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.circuit import Circuit
from ..core.errors import CnaError
from ..core.settings.discover import DiscoverOptions
from ..model.prompts import batches, render

log = logging.getLogger(__name__)

CHANGED = 0.01
"""A neuron counts as changed when ``|m - 1|`` exceeds this."""


@dataclass(frozen=True)
class Objective:
    """The objective's terms on the whole training set (forward passes only)."""

    behaviour: float
    kl: float
    l1: float
    total: float
    benign: float | None = None  # the twins' term before its weight μ (None: no negative prompts)


@dataclass(frozen=True)
class LearnReport:
    """What one optimisation did and cost."""

    neurons: int
    changed: int
    steps: int
    prepare_seconds: float  # the unsteered answers to the benign prompts, their log-probabilities, the twins' gaps
    train_seconds: float
    eval_seconds: float  # the objective before and after, on every training prompt
    before: Objective
    after: Objective
    history: tuple[float, ...]  # the minibatch objective at each step

    @property
    def seconds(self) -> float:
        return self.prepare_seconds + self.train_seconds + self.eval_seconds

    def record(self, opts: DiscoverOptions) -> dict[str, Any]:
        """What the circuit's ``method.learned`` holds."""
        settings = {k: getattr(opts, k) for k in DiscoverOptions.STRATEGY_FIELDS if k.startswith("learn_")}
        return {**settings, "neurons": self.neurons, "changed": self.changed, "changed_above": CHANGED,
                "steps": self.steps, "seconds": round(self.seconds, 2),
                "prepare_seconds": round(self.prepare_seconds, 2), "train_seconds": round(self.train_seconds, 2),
                "eval_seconds": round(self.eval_seconds, 2), "objective_before": asdict(self.before),
                "objective_after": asdict(self.after)}


@dataclass
class _Twins:
    """One fixed batch of negative prompts (the benign twins) with the unsteered model's gap ``B(1)``."""

    batch: Any
    reference: Any  # [rows] float32


@dataclass
class _Benign:
    """One fixed batch of benign prompts with their unsteered answers, teacher-forced."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    mask: Any  # [rows, T] 1 where the kept position scores an answer token
    reference: Any  # [rows, T, vocab] float16 unsteered log-probabilities


class _Scales:
    """The trainable multipliers and the hooks that apply them (one scale vector per touched layer)."""

    def __init__(self, loaded: Any, keys: Sequence[tuple[int, ...]], init: Sequence[float]):
        import torch

        if any(len(k) != 2 for k in keys):
            raise CnaError("not supported yet: learned multipliers on mixture-of-experts neurons")
        self.loaded = loaded
        self.m = torch.tensor(list(init), dtype=torch.float32, requires_grad=True)
        lists: dict[int, tuple[list[int], list[int]]] = {}
        for pos, (layer, index) in enumerate(keys):
            lists.setdefault(layer, ([], []))[0].append(index)
            lists[layer][1].append(pos)
        # layer -> (neuron indices, their positions in m)
        self.groups = {layer: (torch.tensor(i), torch.tensor(p)) for layer, (i, p) in sorted(lists.items())}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        import torch

        handles = []
        try:
            for layer, (idx, pos) in self.groups.items():
                down = self.loaded.down_proj(layer)
                width = down.weight.shape[1]

                def pre(module: Any, args: tuple, idx: Any = idx, pos: Any = pos, width: int = width) -> tuple:
                    x = args[0]
                    s = torch.ones(width, dtype=torch.float32, device=x.device).index_put(
                        (idx.to(x.device),), self.m[pos].to(x.device))
                    return ((x.float() * s).to(x.dtype), *args[1:])

                handles.append(down.register_forward_pre_hook(pre))
            yield
        finally:
            for h in handles:
                h.remove()

    def l1(self) -> float:
        return float((self.m.detach() - 1).abs().sum())


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """No parameter gradients: the graph holds only the multipliers."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _positive_batches(loaded: Any, texts: Sequence[str], opts: DiscoverOptions) -> list[Any]:
    rendered = render(loaded.tokenizer, texts, opts.chat_template, opts.system_prompt)
    return list(batches(loaded.tokenizer, rendered, opts.learn_batch, opts.chat_template, loaded.input_device,
                        opts.max_length))


def _benign_batches(loaded: Any, texts: Sequence[str], opts: DiscoverOptions) -> list[_Benign]:
    """The unsteered model's first ``learn_kl_tokens`` greedy answer tokens, teacher-forced in fixed batches
    (prompt + answer minus its last token: the last ``len(answer)`` positions predict the answer)."""
    import torch

    from ..model.generation import greedy_generate

    tok = loaded.tokenizer
    answers = greedy_generate(loaded, texts, opts.learn_kl_tokens, opts.chat_template, opts.system_prompt,
                              opts.learn_batch)
    rendered = render(tok, texts, opts.chat_template, opts.system_prompt)
    prompts = tok(rendered, add_special_tokens=not opts.chat_template)["input_ids"]
    seqs = [(list(p) + g.tokens[:-1], len(g.tokens)) for p, g in zip(prompts, answers)]
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[_Benign] = []
    for start in range(0, len(order), opts.learn_batch):
        rows = [seqs[i] for i in order[start : start + opts.learn_batch]]
        width, keep = max(len(s) for s, _ in rows), max(n for _, n in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), keep))
        for r, (seq, n) in enumerate(rows):
            ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            att[r, width - len(seq):] = 1
            mask[r, keep - n:] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        dev = loaded.input_device
        b = _Benign(ids.to(dev), att.to(dev), pos.to(dev), mask.to(dev), None)
        with torch.no_grad():
            b.reference = _log_probs(loaded, b).to(torch.float16)
        out.append(b)
    return out


def _log_probs(loaded: Any, b: _Benign) -> Any:
    import torch

    out = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       use_cache=False, logits_to_keep=b.mask.shape[1])
    return torch.log_softmax(out.logits.float(), dim=-1)


def _kl(loaded: Any, b: _Benign) -> Any:
    """Mean over rows of the per-row mean KL(unsteered || steered) over its answer positions."""
    import torch

    ref = torch.log_softmax(b.reference.float(), dim=-1)  # the float16-rounded distribution, renormalised
    per_pos = (ref.exp() * (ref - _log_probs(loaded, b))).sum(-1)
    return ((per_pos * b.mask).sum(1) / b.mask.sum(1)).mean()


def _gap(loaded: Any, batch: Any, ids: tuple[list[int], list[int]]) -> Any:
    """``B`` per row: the refusal-minus-compliance log-probability gap of the first answer token."""
    from .scores import behaviour_score

    out = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    return behaviour_score(out.logits[:, -1, :], *ids)


def _behaviour(loaded: Any, batch: Any, ids: tuple[list[int], list[int]], sign: float) -> Any:
    import torch

    return torch.nn.functional.softplus(sign * _gap(loaded, batch, ids)).mean()


def _twin_batches(loaded: Any, texts: Sequence[str], ids: tuple[list[int], list[int]],
                  opts: DiscoverOptions) -> list[_Twins]:
    """The negative prompts in fixed batches, each with its unsteered gaps (no hooks are applied here)."""
    import torch

    out = []
    for b in _positive_batches(loaded, texts, opts):
        with torch.no_grad():
            out.append(_Twins(b, _gap(loaded, b, ids).float()))
    return out


def _twin_term(loaded: Any, t: _Twins, ids: tuple[list[int], list[int]], sign: float) -> Any:
    """``mean max(0, -s (B(m) - B(1)))²`` over one twin batch (``sign``: the positive term's ``s``)."""
    return (-sign * (_gap(loaded, t.batch, ids) - t.reference)).clamp(min=0).square().mean()


@dataclass
class _Problem:
    """Everything a step or an evaluation of the objective needs."""

    loaded: Any
    scales: _Scales
    positive: list[Any]
    benign: list[_Benign]
    twins: list[_Twins]
    ids: tuple[list[int], list[int]]
    sign: float
    opts: DiscoverOptions

    def objective(self) -> Objective:
        """``J`` on every training prompt (weighted by rows), no gradients."""
        import torch

        lam, mu = self.opts.learn_kl_weight, self.opts.learn_benign_weight
        with torch.no_grad(), self.scales.applied():
            n_p = sum(len(b.input_ids) for b in self.positive)
            beh = sum(float(_behaviour(self.loaded, b, self.ids, self.sign)) * len(b.input_ids)
                      for b in self.positive) / n_p
            n_b = sum(len(b.input_ids) for b in self.benign)
            kl = sum(float(_kl(self.loaded, b)) * len(b.input_ids) for b in self.benign) / max(n_b, 1)
            n_t = sum(len(t.reference) for t in self.twins)
            twin = (sum(float(_twin_term(self.loaded, t, self.ids, self.sign)) * len(t.reference)
                        for t in self.twins) / n_t) if n_t else None
        l1 = self.opts.learn_l1 * self.scales.l1()
        return Objective(beh, kl, l1, beh + lam * kl + mu * (twin or 0.0) + l1, twin)

    def step_loss(self, pos: Any, ben: _Benign | None, twin: _Twins | None = None) -> Any:
        loss = _behaviour(self.loaded, pos, self.ids, self.sign)
        if ben is not None and self.opts.learn_kl_weight > 0:
            loss = loss + self.opts.learn_kl_weight * _kl(self.loaded, ben)
        if twin is not None and self.opts.learn_benign_weight > 0:
            loss = loss + self.opts.learn_benign_weight * _twin_term(self.loaded, twin, self.ids, self.sign)
        return loss


def _prox(opt: Any, m: Any, lr: float, l1: float) -> None:
    """Soft-threshold ``m - 1`` by ``lr l1 / (sqrt(v̂) + eps)``: the L1's proximal map in Adam's metric."""
    import torch

    if l1 <= 0:
        return
    state = opt.state[m]
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    thr = lr * l1 / (v_hat.sqrt() + eps)
    with torch.no_grad():
        d = m - 1
        m.copy_(1 + d.sign() * (d.abs() - thr).clamp(min=0))


def _order(n: int, steps: int, rng: np.random.Generator) -> list[int]:
    """``steps`` batch numbers: seeded permutations of ``range(n)``, one after another."""
    out: list[int] = []
    while len(out) < steps:
        out.extend(int(i) for i in rng.permutation(n))
    return out[:steps]


def _train(p: _Problem) -> list[float]:
    import torch

    o = p.opts
    opt = torch.optim.Adam([p.scales.m], lr=o.learn_lr)
    rng = np.random.default_rng(o.learn_seed)
    pos_order = _order(len(p.positive), o.learn_steps, rng)
    ben_order = _order(len(p.benign), o.learn_steps, rng) if p.benign else [None] * o.learn_steps
    # drawn last and only when used: mu = 0 draws the same batches as before the term existed
    twin_order = (_order(len(p.twins), o.learn_steps, rng) if p.twins and o.learn_benign_weight > 0
                  else [None] * o.learn_steps)
    history = []
    for i, j, t in zip(pos_order, ben_order, twin_order):
        opt.zero_grad()
        with p.scales.applied():
            loss = p.step_loss(p.positive[i], p.benign[j] if j is not None else None,
                               p.twins[t] if t is not None else None)
        loss.backward()
        opt.step()
        _prox(opt, p.scales.m, o.learn_lr, o.learn_l1)
        history.append(float(loss.detach()) + o.learn_l1 * p.scales.l1())
        log.info("learned multipliers: step %d/%d, minibatch objective %.4f", len(history), o.learn_steps,
                 history[-1])
    return history


def learn_multipliers(loaded: Any, keys: Sequence[tuple[int, ...]], positive: Sequence[str],
                      benign: Sequence[str], opts: DiscoverOptions,
                      init: Sequence[float] | None = None,
                      negative: Sequence[str] = ()) -> tuple[np.ndarray, LearnReport]:
    """One multiplier per neuron of ``keys`` (``(layer, index)``), fitted on ``positive`` (the behaviour),
    ``benign`` (the negative and neutral prompts: the KL) and ``negative`` (the benign twins: the term
    weighted by ``learn_benign_weight``); see the module docstring."""
    import torch

    from .scores import opening_token_ids

    if not keys:
        raise CnaError("learned multipliers need at least one circuit neuron")
    if len(positive) < 1:
        raise CnaError("learned multipliers need positive prompts")
    if opts.learn_benign_weight > 0 and not negative:
        raise CnaError("--learn-benign-weight needs the negative prompts (the benign twins)")
    init = [1.0] * len(keys) if init is None else list(init)
    t0 = time.perf_counter()
    with _frozen(loaded.model), torch.enable_grad():
        scales = _Scales(loaded, keys, init)
        ids = opening_token_ids(loaded.tokenizer)
        p = _Problem(loaded, scales, _positive_batches(loaded, positive, opts),
                     _benign_batches(loaded, benign, opts) if benign else [],
                     _twin_batches(loaded, negative, ids, opts) if negative else [], ids,
                     1.0 if opts.learn_goal == "suppress" else -1.0, opts)
        t1 = time.perf_counter()
        before = p.objective()
        t2 = time.perf_counter()
        history = _train(p)
        t3 = time.perf_counter()
        after = p.objective()
        t4 = time.perf_counter()
    m = scales.m.detach().double().numpy().copy()
    if not np.all(np.isfinite(m)):
        raise CnaError("learned multipliers diverged (not finite): lower --learn-lr")
    changed = int((np.abs(m - 1) > CHANGED).sum())
    report = LearnReport(len(keys), changed, opts.learn_steps, t1 - t0, t3 - t2, (t2 - t1) + (t4 - t3), before,
                         after, tuple(history))
    return m, report


def learn_circuit(loaded: Any, circuit: Circuit, prompt_sets: Mapping[str, Any], opts: DiscoverOptions) -> Circuit:
    """``circuit`` with learned multipliers (starting from its own, else 1) and ``method.learned``."""
    if getattr(loaded, "model", None) is None:
        raise CnaError("learned multipliers need the model itself (transformers), not saved statistics alone")
    texts = {name: getattr(ps, "texts", None) for name, ps in prompt_sets.items()}
    if texts.get("positive") is None:
        raise CnaError("learned multipliers need the positive prompts themselves")
    benign = [t for name in ("negative", "neutral") for t in (texts.get(name) or ())]
    init = [1.0 if n.multiplier is None else n.multiplier for n in circuit.neurons]
    m, report = learn_multipliers(loaded, circuit.keys(), list(texts["positive"]), benign, opts, init,
                                  negative=list(texts.get("negative") or ()))
    neurons = [n.model_copy(update={"multiplier": float(v)}) for n, v in zip(circuit.neurons, m)]
    return circuit.model_copy(update={"neurons": neurons, "method": {**circuit.method,
                                                                      "learned": report.record(opts)}})
