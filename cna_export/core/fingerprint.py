"""The model fingerprint: one definition for loaded models, safetensors folders and GGUF files.

The fingerprint hashes every layer's down projection weight as float32 little-endian bytes, each in the
Hugging Face layout ``[hidden, intermediate]`` (what transformers holds after loading, also after
dequantising a GGUF); a mixture-of-experts layer's down projections come in expert order, then the shared
expert's. Three schemes exist; a fingerprint's text says which one it is:

- **scheme 1** (64 hex digits, every circuit written before scheme 2): one sha256 over all layers' bytes in
  layer order. It is inherently sequential (7.5 GB of float32 through one sha256 at the 8B shape).
- **scheme 2** (``"2:"`` then 64 hex digits): the sha256 of each layer's bytes on its own, then the sha256
  over the 32-byte layer digests in layer order. Layers are hashed on several threads (hashlib, numpy and
  ggml's dequantisation release the GIL), each a chunk at a time.
- **scheme 3** (``"3:"`` then 64 hex digits, every new fingerprint): scheme 2 with BLAKE3 in place of sha256,
  for the layers and for their digests. BLAKE3 is a cryptographic hash too, and hashes about twice as many
  bytes a second as sha256 (with SHA-NI) on one core; sha256 was most of a cold export's CPU time
  (bench/README.md, "fingerprint scheme 3").

Values of different schemes can never be equal (the prefixes), and fingerprints of different schemes are
never compared: a circuit that carries a scheme-1 fingerprint is checked against the model's scheme-1
fingerprint (:meth:`cna_export.core.circuit.Circuit.check_fits`). Readers give each layer as a callable
that yields its float32 chunks, so no reader holds more than a chunk per thread in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from .errors import CnaError

SCHEME = 3
"""The scheme of every fingerprint computed for a new identity, circuit, export or cache entry."""

FINGERPRINT_METHODS = {
    1: "sha256(fp32 little-endian down_proj weights, layer order)",
    2: "scheme 2: sha256(sha256 of each layer's fp32 little-endian down_proj weights, layer order)",
    3: "scheme 3: blake3(blake3 of each layer's fp32 little-endian down_proj weights, layer order)",
}
"""What each scheme hashes, as recorded in circuits and manifests (``fingerprint_method``)."""

FINGERPRINT_METHOD = FINGERPRINT_METHODS[SCHEME]

PREFIX = {1: "", 2: "2:", 3: "3:"}
"""The text before a fingerprint's 64 hex digits, by scheme."""

MAX_THREADS = 8
"""At most this many threads hash one fingerprint (each holds one chunk; on this project's CPU sha256 runs at
~1.7 GB/s a core, BLAKE3 at ~3.6 GB/s)."""

_TEXT = re.compile(r"(?:([23]):)?[0-9a-f]{64}")

Layer = Callable[[], Iterable[Any]]
"""One layer's down projection(s): called once, yields float32 chunks (numpy arrays or what ``np.asarray``
takes) in order."""


def scheme_of(fingerprint: str) -> int:
    """The scheme of a fingerprint's text (1: 64 hex digits; 2 or 3: ``"2:"`` or ``"3:"`` and 64 hex digits)."""
    m = _TEXT.fullmatch(fingerprint)
    if m is None:
        raise CnaError(f"not a model fingerprint: {fingerprint[:80]!r} "
                       "(expected 64 hex digits, or '2:' or '3:' and 64)")
    return int(m.group(1) or 1)


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` is a fingerprint of a known scheme."""
    return _TEXT.fullmatch(text) is not None


def method_of(fingerprint: str | None) -> str:
    """The ``fingerprint_method`` text that goes with a fingerprint (the current scheme's for None)."""
    return FINGERPRINT_METHODS[SCHEME if fingerprint is None else scheme_of(fingerprint)]


def other_than(fingerprint: str) -> str:
    """A fingerprint of the same scheme that differs from ``fingerprint`` (for sizing a mismatch's note)."""
    scheme = scheme_of(fingerprint)
    digits = fingerprint[len(PREFIX[scheme]):]
    return PREFIX[scheme] + ("1" if digits.startswith("0" * 12) else "0") * 64


def default_threads() -> int:
    """Threads for one fingerprint: the CPUs this process may run on, at most :data:`MAX_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _feed(h: Any, chunks: Iterable[Any]) -> None:
    import numpy as np  # here: importing the method name (circuits, the cache) must not cost numpy's import

    for w in chunks:
        h.update(np.ascontiguousarray(np.asarray(w), dtype="<f4").reshape(-1).view(np.uint8))


def _hasher(scheme: int) -> Any:
    """A new hash object of ``scheme``'s function: sha256 (schemes 1 and 2) or BLAKE3 (scheme 3)."""
    if scheme == 3:
        from blake3 import blake3  # here: only hashing needs it

        return blake3()
    return hashlib.sha256()


def fingerprint(down_weights: Iterable[Any]) -> str:
    """The scheme-1 fingerprint of down projection weights given in layer order (numpy arrays or anything
    ``np.asarray`` takes; torch tensors must already be on the CPU in float32): one sha256 over them all."""
    h = hashlib.sha256()
    _feed(h, down_weights)
    return h.hexdigest()


def layer_digest(chunks: Iterable[Any], scheme: int = SCHEME) -> bytes:
    """The digest of one layer's float32 chunks (the unit of schemes 2 and 3)."""
    h = _hasher(scheme)
    _feed(h, chunks)
    return h.digest()


def combine(digests: Iterable[bytes], scheme: int = SCHEME) -> str:
    """The scheme-2 or scheme-3 fingerprint of the layer digests, in layer order."""
    h = _hasher(scheme)
    for d in digests:
        h.update(d)
    return PREFIX[scheme] + h.hexdigest()


def fingerprint_layers(layers: Sequence[Layer], scheme: int = SCHEME, threads: int | None = None) -> str:
    """The fingerprint of the layers' down projections in ``scheme``: scheme 1 on this thread, one layer after
    another; schemes 2 and 3 on ``threads`` threads (default :func:`default_threads`), a layer per task, the layer
    digests combined in layer order (the value does not depend on the number of threads)."""
    if scheme == 1:
        return fingerprint(chunk for layer in layers for chunk in layer())
    if scheme not in (2, 3):
        raise CnaError(f"unknown fingerprint scheme {scheme} (known: {', '.join(map(str, FINGERPRINT_METHODS))})")
    n = max(1, min(threads or default_threads(), len(layers)))
    if n == 1:
        return combine((layer_digest(layer(), scheme) for layer in layers), scheme)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="cna-fingerprint-layer") as pool:
        return combine(pool.map(lambda layer: layer_digest(layer(), scheme), layers), scheme)


def rehash_while_alive(owner: Any, compute: Callable[[Any, int], str | None]) -> Callable[[int], str | None]:
    """``compute(owner, scheme)`` for as long as ``owner`` lives (None after): how an identity hashes its weights
    again in another scheme without keeping the model or reader that holds them alive."""
    ref = weakref.ref(owner)

    def rehash(scheme: int) -> str | None:
        alive = ref()
        return None if alive is None else compute(alive, scheme)

    return rehash
