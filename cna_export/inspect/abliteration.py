"""Low-rank directional edits of the residual writers: abliteration as other tools ship it.

Directional ablation ("abliteration") removes a residual direction ``r`` from what a matrix writes
into the residual stream: ``W' = W - lam r r^T W`` for ``o_proj``/``down_proj`` (``W`` is
``[hidden, in]``) and ``E' = E - lam E r r^T`` for the embeddings and ``lm_head`` (``[vocab, hidden]``).
Tools in the wild vary it: the strength ``lam`` varies per layer (a weight kernel), the direction is
interpolated between layers, the write vectors are renormalised to their old norms afterwards
("norm-preserving"; the change is then rank 1 plus a small full-rank part, or a rank-k LoRA when it is
shipped merged from one), and the direction may first be orthogonalised against the harmless mean
("biprojected"). The checkpoint may then be quantised (GGUF Q8_0, Q4_K_M ...) while the base is float.

:class:`DirectionalScan` looks for all of these from the difference ``X_l = B_l - A_l`` of each
residual writer (hidden axis first), without assuming rank 1:

1. *Pass 1* (while the diff has both tensors in memory): the Gram matrix ``G_l = X_l X_l^T`` on the
   hidden side. Its top-k eigenvalues give the rank profile. Its *hollow* part (diagonal removed),
   divided by the mean noise per direction ``tau_l = tr G_l / hidden``, is summed over the layers'
   writers. Element noise (quantisation, rounding, a fine-tune's independent perturbations) is
   uncorrelated between hidden rows, so it adds nothing to the hollow sum in expectation; an edit along
   one shared direction adds a spike. The spike is tested against a permutation null: the same sum with
   every hidden row of every ``X_l`` independently shuffled (same row distributions, correlation between
   rows destroyed).
2. The *consensus direction* ``r`` is the top eigenvector of that sum.
3. *Pass 2* (each writer read again): along ``r``, per tensor, ``d = r^T X`` and ``a = r^T A``:
   the strength ``lam = -(d . a) / (a . a)`` (1: everything along ``r`` removed; 0.5: half),
   the projection correlation ``-(d . a) / (|d| |a|)`` (1: the change along ``r`` is a multiple of what
   the base wrote along ``r``, as in a projection), the concentration
   ``rho = |d|^2 / r^T diag(G) r`` (about 1 for noise, about hidden/3 for an exact rank-1 edit; its
   z-score ``(rho - 1) / sqrt(2 / n)`` flags a tensor), and whether write-vector norms were kept
   (the slope of the change of each write vector's squared norm on ``a_j^2``: ``-lam (2 - lam)`` for a
   plain projection, 0 when the norms were restored).

A *directional edit* is reported when the hollow spike beats the permutation null by
:data:`COHERENCE_MARGIN`, at least one writer is flagged along ``r``, and most of the flagged writers'
spike energy lies along the one direction (:data:`SHARED_MIN`); it is a *directional ablation* when the
flagged writers' strengths are positive and their projection correlations high.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import CnaError

SCHEMA = 1
RANK_K = 4  # "low rank": the change's energy in its top k singular values
LOW_RANK_SHARE = 0.9  # share of the energy in the top k for "low rank"
COHERENCE_MARGIN = 1.5  # observed hollow spike / largest permuted spike
PERMUTATIONS = 2
LAYER_Z = 8.0  # z-score of a writer's concentration along r that flags it
SHARED_MIN = 0.5  # share of the flagged writers' spike energy that lies along the consensus direction
PROJECTION_EXPLAINED = 0.5  # a flagged writer is a projection when lam * a explains this share of its excess along r
NORM_KEPT = 0.75  # kappa below this: write-vector norms restored (norm-preserving)
_CHUNK = 1 << 22
SUPPORT_KINDS = ("rank-1 projection", "norm-preserving projection", "other low rank")
REFUSAL_COS = 0.5  # |cos| of the consensus with the base's refusal direction that says refusals were targeted


@dataclass
class WriterEdit:
    """One residual-writing tensor seen along the consensus direction."""

    name: str
    role: str
    layer: int | None
    samples: int  # the non-hidden dimension (columns of o_proj/down_proj, rows of embeddings)
    top_shares: list[float]  # top eigenvalue shares of the change's Gram matrix (hidden side)
    rank_share: float | None  # sum of the top-k shares
    own_cos: float | None  # |cos| of the tensor's own top (hollow) direction with the consensus
    strength: float | None = None  # fraction of the projection on r removed (lam)
    projection_corr: float | None = None
    concentration: float | None = None  # rho
    z: float | None = None
    norm_kappa: float | None = None  # 1: norms shrank as a plain projection's do; 0: norms kept
    strength_se: float | None = None  # standard error of the strength under the noise along r
    norm_kappa_se: float | None = None
    explained: float | None = None  # share of the change's energy along r beyond noise that lam * a explains
    flagged: bool = False
    kind: str | None = None  # rank-1 projection | norm-preserving projection | other low rank | other


@dataclass
class RefusalCosines:
    """|cos| of the consensus direction with the base's refusal direction of each layer."""

    source: str
    per_layer: list[float]
    best_cos: float
    best_layer: int
    edited_layers_mean_cos: float | None
    threshold: float


@dataclass
class DirectionalFinding:
    """The low-rank directional analysis of a diff (typed, versioned: ``schema``)."""

    schema: int
    hidden: int
    rank_k: int
    spike: float  # top eigenvalue of the normalised hollow sum
    null_spike: float  # largest of the permuted sums' top eigenvalues
    coherent: bool
    shared_share: float | None
    detected: bool  # a coherent edit along one shared residual direction
    ablation: bool  # ... that removes (part of) what the writers wrote along it
    kind: str | None  # dominant kind among the flagged writers
    layers: list[int]
    writers: list[WriterEdit]
    direction: list[float] | None = None
    refusal: RefusalCosines | None = None  # cosine with the base's refusal directions (filled in by audit)
    notes: list[str] = field(default_factory=list)

    def flagged(self) -> list[WriterEdit]:
        """Writers whose change concentrates along the consensus direction (edit or structured noise)."""
        return [w for w in self.writers if w.flagged]

    def support(self) -> list[WriterEdit]:
        """Flagged writers whose change along the direction is the edit: projections and low-rank changes."""
        return [w for w in self.writers if w.flagged and w.kind in SUPPORT_KINDS]

    def profile(self) -> dict[int, float]:
        """Layer -> mean strength of its supporting writers."""
        out: dict[int, list[float]] = {}
        for w in self.support():
            if w.layer is not None and w.strength is not None:
                out.setdefault(w.layer, []).append(w.strength)
        return {l: float(np.mean(v)) for l, v in sorted(out.items())}

    def summary(self) -> str:
        fl = self.support()
        prof = self.profile()
        emb = [w.name for w in fl if w.layer is None]
        where = layer_ranges(self.layers) if self.layers else "embeddings only"
        if prof:
            peak = max(prof, key=lambda l: prof[l])
            strength = (f"strength {min(prof.values()):.2f}-{max(prof.values()):.2f}, peak {prof[peak]:.2f} at "
                        f"layer {peak}")
        else:
            strength = "strength " + ", ".join(f"{w.strength:.2f}" for w in fl if w.strength is not None)
        what = f"layers {where}" + (f" and {', '.join(emb)}" if emb and self.layers else "")
        text = (f"{what}; {self.kind or 'low-rank edit'} of one residual direction ({len(fl)} residual-writing "
                f"tensors, {strength}")
        if self.refusal is not None:
            text += (f"; |cos| with the base's refusal direction {self.refusal.best_cos:.2f} (layer "
                     f"{self.refusal.best_layer})")
        text += ")"
        if self.ablation and self.refusal_targeted() is not False:
            return "refusals stripped by directional ablation: " + text
        return ("directional ablation: " if self.ablation else "directional edit: ") + text

    def refusal_targeted(self) -> bool | None:
        if self.refusal is None:
            return None
        return bool(self.refusal.best_cos >= self.refusal.threshold)

    def table(self) -> str:
        rows = ["layer  tensor                                          strength  corr   rho        z       cos    "
                "kind"]
        for w in self.writers:
            rows.append(f"{'-' if w.layer is None else w.layer:>5}  {w.name[:46]:<46}  "
                        f"{_f(w.strength, '8.3f')}  {_f(w.projection_corr, '5.2f')}  {_f(w.concentration, '9.3g')}  "
                        f"{_f(w.z, '7.1f')}  {_f(w.own_cos, '5.2f')}  {(w.kind or '') if w.flagged else '.'}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile"] = {str(k): v for k, v in self.profile().items()}
        return d


def layer_ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (diff and audit use it too)."""
    xs = sorted(set(layers))
    out: list[list[int]] = []
    for x in xs:
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _f(x: float | None, spec: str) -> str:
    if x is None or not math.isfinite(x):
        return "-".rjust(int(spec.split(".")[0]) if spec[0].isdigit() else 1)
    return format(x, spec)


def hidden_first(M: np.ndarray, hidden_axis: int) -> np.ndarray:
    return M if hidden_axis == 0 else M.T


def _gram(X: np.ndarray) -> np.ndarray:
    """X X^T in float64, in column chunks."""
    H, N = X.shape
    G = np.zeros((H, H))
    step = max(1, _CHUNK // max(H, 1))
    for s in range(0, N, step):
        blk = np.asarray(X[:, s : s + step], dtype=np.float64)
        G += blk @ blk.T
    return G


def _hollow(G: np.ndarray, tau: float) -> np.ndarray:
    Hh = G / tau
    np.fill_diagonal(Hh, 0.0)
    return Hh


def _top(M: np.ndarray) -> tuple[float, np.ndarray]:
    w, V = np.linalg.eigh(M)
    v = V[:, -1]
    return float(w[-1]), v * (1.0 if v[np.argmax(np.abs(v))] >= 0 else -1.0)


@dataclass
class _Pass1:
    name: str
    role: str
    layer: int | None
    hidden_axis: int
    samples: int
    diag: np.ndarray
    trace: float
    top_shares: list[float]
    own: np.ndarray | None
    spike: float


class DirectionalScan:
    """Accumulates residual writers' changes during a diff (pass 1); :meth:`finish` runs pass 2."""

    def __init__(self, hidden: int, rank_k: int = RANK_K, permutations: int = PERMUTATIONS, seed: int = 0):
        self.hidden = hidden
        self.rank_k = rank_k
        self.permutations = permutations
        self.rng = np.random.default_rng(seed)
        self.S = np.zeros((hidden, hidden))
        self.S_null = [np.zeros((hidden, hidden)) for _ in range(permutations)]
        self.items: list[_Pass1] = []
        self.notes: list[str] = []

    def add(self, name: str, role: str, layer: int | None, hidden_axis: int, A: np.ndarray, B: np.ndarray) -> None:
        if A.ndim != 2 or A.shape != B.shape:
            return
        X = hidden_first(np.asarray(B, dtype=np.float64) - np.asarray(A, dtype=np.float64), hidden_axis)
        if X.shape[0] != self.hidden:
            return
        X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
        H, N = X.shape
        if layer is None:  # embeddings / lm_head: diagonal only (their Gram over the vocabulary is costly)
            diag = np.einsum("ij,ij->i", X, X)
            tr = float(diag.sum())
            if tr > 0:
                self.items.append(_Pass1(name, role, layer, hidden_axis, N, diag, tr, [], None, 0.0))
            return
        G = _gram(X)
        tr = float(np.trace(G))
        if not tr > 0 or not math.isfinite(tr):
            return
        tau = tr / H
        w = np.linalg.eigvalsh(G)[::-1]
        shares = [float(max(x, 0.0) / tr) for x in w[: self.rank_k]]
        Hh = _hollow(G, tau)
        spike, own = _top(Hh)
        self.S += Hh
        X32 = X.astype(np.float32)
        for S0 in self.S_null:  # float32 is plenty for the null
            Xp = self.rng.permuted(X32, axis=1)
            S0 += _hollow((Xp @ Xp.T).astype(np.float64), tau)
        del X32
        self.items.append(_Pass1(name, role, layer, hidden_axis, N, np.diag(G).copy(), tr, shares, own, spike))

    def finish(self, read_pair: Callable[[str], tuple[np.ndarray, np.ndarray]], rank1_share: float = 0.95
               ) -> DirectionalFinding | None:
        """Pass 2: ``read_pair(name)`` returns (base, suspect) arrays of a tensor given to :meth:`add`."""
        layered = [p for p in self.items if p.layer is not None]
        if not layered:
            return None
        spike, r = _top(self.S)
        null = max((_top(S0)[0] for S0 in self.S_null), default=0.0)
        coherent = spike > COHERENCE_MARGIN * max(null, 0.0) and spike > 0
        writers = [_along(p, r, *read_pair(p.name)) for p in self.items]
        for we in writers:
            we.flagged = bool(coherent and we.z is not None and we.z >= LAYER_Z)
            if we.flagged:
                we.kind = _kind(we, rank1_share)
        fl = [w for w in writers if w.flagged]
        shared = self._shared_share(writers, r)
        proj = [w for w in fl if w.kind in ("rank-1 projection", "norm-preserving projection")]
        low = [w for w in fl if w.kind == "other low rank"]
        # a steering edit: coherent, and shaped like a projection on the consensus direction in two writers or
        # more (independent changes are not proportional to what the base wrote along one direction), or in
        # one writer / low rank in two or more whose changes lie mostly along that one direction (a
        # fine-tune's low-rank changes do not share one direction)
        detected = bool(coherent and (len(proj) >= 2 or ((proj or len(low) >= 2)
                                                          and (shared is None or shared >= SHARED_MIN))))
        ablation = bool(detected and len(proj) * 2 > len(proj) + len(low)
                        and np.median([w.strength for w in proj if w.strength is not None]) > 0)
        kinds: dict[str, int] = {}
        for w in [w for w in fl if w.kind in SUPPORT_KINDS] or fl:
            kinds[w.kind or "other"] = kinds.get(w.kind or "other", 0) + 1
        kind = max(kinds, key=lambda k: kinds[k]) if kinds else None
        return DirectionalFinding(
            schema=SCHEMA, hidden=self.hidden, rank_k=self.rank_k, spike=spike, null_spike=null, coherent=coherent,
            shared_share=shared, detected=detected, ablation=ablation, kind=kind,
            layers=sorted({w.layer for w in fl if w.layer is not None and w.kind in SUPPORT_KINDS}), writers=writers,
            direction=[float(x) for x in r] if detected else None, notes=list(self.notes),
        )

    def _shared_share(self, writers: list[WriterEdit], r: np.ndarray) -> float | None:
        """The writers carrying the edit (structured quantisation noise can flag a writer too; it is no
        support): their normalised hollow energy along ``r``, over their own top spikes."""
        fl_layer = [(p, w) for p, w in zip(self.items, writers, strict=True)
                    if w.flagged and w.kind in SUPPORT_KINDS and p.layer is not None]
        if not fl_layer:
            return None
        got = sum(((w.concentration or 0.0) - 1.0) * float(r**2 @ p.diag) / (p.trace / self.hidden)
                  for p, w in fl_layer)
        tot = sum(max(p.spike, 0.0) for p, _ in fl_layer)
        return float(min(1.0, max(got, 0.0) / tot)) if tot > 0 else None


def _along(p: _Pass1, r: np.ndarray, A: np.ndarray, B: np.ndarray) -> WriterEdit:
    """One writer along the consensus direction ``r``: strength, projection correlation, concentration."""
    A2 = hidden_first(np.asarray(A, dtype=np.float64), p.hidden_axis)
    B2 = hidden_first(np.asarray(B, dtype=np.float64), p.hidden_axis)
    a = r @ A2
    d = r @ B2 - a
    aa = float(a @ a)
    dd = float(d @ d)
    noise = float(r**2 @ p.diag)
    we = WriterEdit(p.name, p.role, p.layer, p.samples, p.top_shares,
                    float(sum(p.top_shares)) if p.top_shares else None,
                    float(abs(p.own @ r)) if p.own is not None else None)
    if aa > 0:
        we.strength = -float(d @ a) / aa
    if aa > 0 and dd > 0:
        we.projection_corr = -float(d @ a) / math.sqrt(aa * dd)
    if noise > 0:
        we.concentration = dd / noise
        we.z = (we.concentration - 1.0) / math.sqrt(2.0 / max(p.samples, 1))
        if aa > 0 and we.strength is not None:
            we.strength_se = math.sqrt(noise / max(p.samples, 1) / aa)
            if dd > noise:
                we.explained = min(1.0, we.strength**2 * aa / (dd - noise))
    if we.strength is not None and aa > 0:
        _norm_kappa(we, A2, B2, a)
    return we


def _norm_kappa(we: WriterEdit, A2: np.ndarray, B2: np.ndarray, a: np.ndarray) -> None:
    """Write-vector norms: the slope of the change of ``|w_j|^2`` on ``a_j^2``, over a plain projection's."""
    dn = np.einsum("ij,ij->j", B2, B2) - np.einsum("ij,ij->j", A2, A2)
    pa = a * a
    pc = pa - pa.mean()
    den = float(pc @ pc)
    lam = we.strength
    assert lam is not None
    expect = -lam * (2.0 - lam)
    if den > 0 and abs(expect) > 1e-9:
        dnc = dn - dn.mean()
        slope = float(dnc @ pc / den)
        resid = dnc - slope * pc
        slope_se = math.sqrt(float(resid @ resid) / max(dn.size - 2, 1) / den)
        we.norm_kappa = slope / expect
        we.norm_kappa_se = slope_se / abs(expect)


def _kind(w: WriterEdit, rank1_share: float) -> str:
    """A projection: the strength is significant and ``lam * a`` explains most of the change's energy along
    ``r`` beyond the noise (with no noise that is ``corr^2 >= 0.5``); norm-preserving when kappa is
    confidently below :data:`NORM_KEPT`."""
    significant = (w.strength is not None and w.strength_se is not None and w.strength != 0
                   and abs(w.strength) >= 3 * w.strength_se)
    if significant and w.explained is not None and w.explained >= PROJECTION_EXPLAINED:
        if w.norm_kappa is not None and w.norm_kappa + 2 * (w.norm_kappa_se or 0.0) < NORM_KEPT:
            return "norm-preserving projection"
        return "rank-1 projection"
    if w.rank_share is not None and w.rank_share >= LOW_RANK_SHARE:
        return "other low rank"
    return "other"


# ---------------------------------------------------------------------------
# Outputs: direction file, plot
# ---------------------------------------------------------------------------


def save_direction(path: str | Path, finding: DirectionalFinding, overwrite: bool = False) -> Path:
    """The consensus direction as ``.npy`` or ``.safetensors`` (by suffix), written atomically."""
    from ..core.atomic import atomic_file

    if finding.direction is None:
        raise CnaError("no directional edit was found, so there is no direction to save")
    p = Path(path)
    v = np.asarray(finding.direction, dtype=np.float32)
    if p.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        data = buf.getvalue()
    elif p.suffix == ".safetensors":
        from safetensors.numpy import save

        meta = {"kind": "consensus residual direction", "schema": str(SCHEMA),
                "layers": ",".join(map(str, finding.layers))}
        data = save({"direction": v}, metadata=meta)
    else:
        raise CnaError(f"--save-direction {p}: use a .npy or .safetensors file name")
    with atomic_file(p, overwrite=overwrite) as fh:
        fh.write(data)
    return p


def plot_profile(path: str | Path, finding: DirectionalFinding, title: str = "", overwrite: bool = False) -> Path:
    """Per-layer strength (and concentration z) of the writers along the consensus direction, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for role, marker in (("attn_output", "o"), ("ffn_down", "s")):
        pts = [(w.layer, w.strength) for w in finding.writers if w.role == role and w.layer is not None
               and w.strength is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker=marker, label={"attn_output": "o_proj", "ffn_down": "down_proj"}[role])
    for w in finding.support():
        if w.layer is not None and w.strength is not None:
            ax.scatter([w.layer], [w.strength], s=80, facecolors="none", edgecolors="red")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("strength (share of projection removed)")
    ax.set_title(title or "directional edit: strength per layer (red: flagged)")
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_file(Path(path), overwrite=overwrite) as fh:
        fh.write(buf.getvalue())
    return Path(path)


def refusal_cosines(direction: Sequence[float], refusal: np.ndarray, layers: Sequence[int],
                    source: str, threshold: float = REFUSAL_COS) -> RefusalCosines:
    """|cos| of a consensus direction with each layer's refusal direction ([layers, hidden], unit rows)."""
    r = np.asarray(direction, dtype=np.float64)
    cos = np.abs(refusal @ r)
    best = int(np.argmax(cos))
    matched = [float(cos[l]) for l in layers if 0 <= l < cos.shape[0]]
    return RefusalCosines(source=source, per_layer=[float(c) for c in cos], best_cos=float(cos[best]), best_layer=best,
                          edited_layers_mean_cos=float(np.mean(matched)) if matched else None, threshold=threshold)
