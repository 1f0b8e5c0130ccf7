"""llama.cpp: the one place the package talks to it (llama-cpp-python's C API, through ctypes).

- :func:`llama_module` imports ``llama_cpp`` once, routes llama.cpp's log lines to this module's
  logger (debug level) and initialises the backend.
- :class:`LlamaModel` is a loaded GGUF (weights, vocabulary, metadata, tokenizer).
- :class:`LlamaContext` holds ``n_seq`` independent KV sequences and decodes batches of
  (token, position, sequence, want_logits) items, optionally with a control vector.
- :func:`llama_logits` gives all-position logits of token id sequences; GGUF verification
  compares them with transformers.
- :func:`ggml_dequantize` and :func:`ggml_quantize` call ggml's own row (de)quantisers in
  llama-cpp-python's ``libggml-base`` (loaded with ctypes, without importing ``llama_cpp``).

llama.cpp's own log lines go to this module's logger at debug level: they show with ``-v`` and
nowhere else (never on stderr by themselves).

Two context profiles exist. The default one is llama.cpp's own defaults (the evaluation
backend: flash attention where llama.cpp chooses it). ``reference=True`` is exactly the setup of
``llama_cpp.Llama`` (flash attention off, the classic YaRN constants, no GPU layers, memory
mapped weights, one micro-batch per prompt): GGUF verification's thresholds were calibrated on
those logits, so :func:`llama_logits` keeps them bit for bit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import CnaError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cna-export[llama]'"

_LOG_CALLBACK: Any = None


def llama_available() -> bool:
    """Whether llama-cpp-python is installed (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def llama_module(purpose: str = "llama.cpp") -> Any:
    """The ``llama_cpp`` module, its log routed to this module's logger and its backend initialised.

    ``purpose`` names what needs it in the error raised when llama-cpp-python is missing.
    """
    # ggml's OpenMP threads spin while waiting by default; on a shared or oversubscribed CPU that is
    # several times slower (measured 5x on 2 shared cores). Passive waiting, unless the user chose.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import llama_cpp
    except ImportError:
        raise CnaError(f"{purpose} needs llama-cpp-python ({INSTALL_HINT})") from None
    first = _LOG_CALLBACK is None
    _route_logs(llama_cpp)
    if first:
        llama_cpp.llama_backend_init()
    return llama_cpp


def _route_logs(L: Any) -> None:
    """Send llama.cpp's (and ggml's) log lines to this module's logger at debug level, nowhere else.

    Importing ``llama_cpp`` installs its own callback, which prints every line to stderr, and
    ``llama_cpp.Llama`` may install it again; so this one is installed on every :func:`llama_module`
    call (each model load), not only the first.
    """
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        @L.llama_log_callback
        def _cb(level: int, text: bytes, user_data: Any) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_CALLBACK = _cb  # kept referenced: llama.cpp holds a pointer to it
    L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _amx_build(L: Any) -> bool:
    """Whether this llama.cpp build uses AMX (from ``llama_print_system_info``)."""
    try:
        info = L.llama_print_system_info().decode("utf-8", "replace")
    except AttributeError:  # an older binding without the call: nothing to avoid
        return False
    return "AMX_INT8 = 1" in info


class _Freed:
    """A llama.cpp object that :meth:`close` frees; freed when garbage-collected too (best effort)."""

    def close(self) -> None:  # pragma: no cover - every subclass frees its own
        raise NotImplementedError

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class LlamaModel(_Freed):
    """A loaded GGUF (weights only; contexts are made separately, see :class:`LlamaContext`).

    ``reference``: load as ``llama_cpp.Llama`` does (no GPU layers, memory-mapped weights).
    """

    def __init__(self, path: str | Path, reference: bool = False, purpose: str = "llama.cpp"):
        L = llama_module(purpose)
        self.L = L
        self.path = Path(path)
        params = L.llama_model_default_params()
        if _amx_build(L) and hasattr(params, "use_extra_bufts"):
            # ggml's AMX matmul segfaults on some AMX machines (ggml-org/llama.cpp#20824; seen on this
            # project's own machines with llama-cpp-python 0.3.36): keep the weights out of the AMX
            # buffer type (the plain CPU kernels run instead, a little slower).
            params.use_extra_bufts = False
        if reference:
            params.n_gpu_layers = 0
            if hasattr(params, "load_mode") and hasattr(L, "LLAMA_LOAD_MODE_MMAP"):
                params.load_mode = L.LLAMA_LOAD_MODE_MMAP
            elif hasattr(params, "use_mmap"):
                params.use_mmap = True
        if not self.path.is_file():
            raise CnaError(f"llama.cpp cannot load {path}: no such file")
        self.model = L.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self.model:
            raise CnaError(f"llama.cpp cannot load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(L.llama_model_n_embd(self.model))
        self.n_layer = int(L.llama_model_n_layer(self.model))

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.L.llama_model_meta_val_str(self.model, key.encode("utf-8"), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def bos(self) -> int:
        return int(self.L.llama_vocab_bos(self.vocab))

    def eos(self) -> int:
        return int(self.L.llama_vocab_eos(self.vocab))

    def token_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, True)
        if n < 0:
            cap = -n
            arr = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, True)
        return list(arr[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        body = [t for t in tokens if not self.L.llama_vocab_is_eog(self.vocab, t)]
        if not body:
            return ""
        arr = (self.L.llama_token * len(body))(*body)
        cap = 8 * len(body) + 64
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self.L.llama_detokenize(self.vocab, arr, len(body), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n + 1

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None


class LlamaLora:
    """A llama.cpp LoRA adapter GGUF loaded for ``lm`` (``llama_adapter_lora_init``); apply it to a
    context with :meth:`LlamaContext.set_lora`. llama.cpp refuses an adapter whose architecture or
    tensor shapes do not fit the model: that is a :class:`CnaError`."""

    def __init__(self, lm: LlamaModel, path: str | Path):
        self.L, self.lm, self.path = lm.L, lm, Path(path)
        if not self.path.is_file():
            raise CnaError(f"llama.cpp cannot load the LoRA adapter {path}: no such file")
        self.ptr = self.L.llama_adapter_lora_init(lm.model, str(path).encode("utf-8"))
        if not self.ptr:
            raise CnaError(f"llama.cpp cannot apply the LoRA adapter {self.path.name} to {lm.path.name} "
                           "(another architecture or other tensor shapes: an adapter for a different base?)")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_adapter_lora_free(self.ptr)
            self.ptr = None


def _reference_settings(L: Any, p: Any) -> None:
    """The context settings of ``llama_cpp.Llama`` that differ from llama.cpp's defaults."""
    p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.rope_scaling_type = L.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
    p.pooling_type = L.LLAMA_POOLING_TYPE_UNSPECIFIED
    p.attention_type = L.LLAMA_ATTENTION_TYPE_UNSPECIFIED
    p.rope_freq_base = 0.0
    p.rope_freq_scale = 0.0
    p.yarn_ext_factor = -1.0
    p.yarn_attn_factor = 1.0
    p.yarn_beta_fast = 32.0
    p.yarn_beta_slow = 1.0
    p.yarn_orig_ctx = 0
    p.embeddings = False
    p.offload_kqv = True
    p.no_perf = False


class LlamaContext(_Freed):
    """One llama.cpp context holding ``n_seq`` independent KV sequences of ``n_ctx_seq`` tokens each.

    ``n_ubatch``: tokens per micro-batch (default ``min(512, n_batch)``). ``reference``: the
    settings of ``llama_cpp.Llama`` (see the module docstring).
    """

    def __init__(self, lm: LlamaModel, n_seq: int, n_ctx_seq: int, n_batch: int, threads: int,
                 n_ubatch: int | None = None, reference: bool = False):
        L = lm.L
        self.L, self.lm = L, lm
        p = L.llama_context_default_params()
        p.n_seq_max = n_seq
        p.n_ctx = n_seq * n_ctx_seq
        p.n_batch = max(n_batch, 1)
        p.n_ubatch = min(n_ubatch or 512, p.n_batch)
        p.n_threads = threads
        p.n_threads_batch = threads
        if reference:
            _reference_settings(L, p)
        self.ctx = L.llama_init_from_model(lm.model, p)
        if not self.ctx:
            raise CnaError("llama.cpp could not create a context (out of memory?)")
        self.batch = L.llama_batch_init(p.n_batch, 0, 1)
        self.capacity = p.n_batch

    def set_control_vector(self, data: np.ndarray | None) -> None:
        """Add ``data[i]`` to the output of layer ``i + 1`` (layers 1..L-1); None removes it."""
        L = self.L
        if data is None:
            rc = L.llama_set_adapter_cvec(self.ctx, None, 0, self.lm.n_embd, -1, -1)
        else:
            flat = np.ascontiguousarray(data, dtype=np.float32).ravel()
            ptr = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = L.llama_set_adapter_cvec(self.ctx, ptr, flat.size, self.lm.n_embd, 1, self.lm.n_layer - 1)
        if rc != 0:
            raise CnaError("llama.cpp rejected the control vector")

    def set_lora(self, adapter: LlamaLora | None, scale: float = 1.0) -> None:
        """Apply ``adapter`` at ``scale`` (``llama_set_adapters_lora``); None removes every adapter."""
        L = self.L
        if adapter is None:
            rc = L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(adapter.ptr)
            scales = (ctypes.c_float * 1)(scale)
            rc = L.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        if rc != 0:
            raise CnaError("llama.cpp rejected the LoRA adapter")

    def clear(self) -> None:
        """Forget every sequence's tokens (the KV cache), keeping the context."""
        memory = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_seq_rm(memory, -1, -1, -1)

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Decode (token, position, sequence, want_logits) items; returns item number -> logits (a copy)."""
        out: dict[int, np.ndarray] = {}
        b = self.batch
        for start in range(0, len(items), self.capacity):
            part = items[start : start + self.capacity]
            for i, (tok, pos, seq, want) in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            b.n_tokens = len(part)
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise CnaError(f"llama.cpp decode failed (code {rc}); try a smaller --batch-size")
            for i, (*_, want) in enumerate(part):
                if want:
                    ptr = self.L.llama_get_logits_ith(self.ctx, i)
                    out[start + i] = np.ctypeslib.as_array(ptr, shape=(self.lm.n_vocab,)).copy()
        return out

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
            self.ctx = None


def llama_logits(path: str | Path, ids: Sequence[Sequence[int]], threads: int = 2,
                 purpose: str = "verifying a GGUF export", lora: str | Path | None = None) -> list[np.ndarray]:
    """All-position logits ``[len(seq), vocab]`` (float32) from llama.cpp for each token id sequence.

    Tokens are fed as they are (no BOS added), each sequence in one decode on a cleared cache of
    one context sized for the longest, with ``llama_cpp.Llama``'s settings (``reference``): the
    logits are those GGUF verification was calibrated on. ``lora``: a LoRA adapter GGUF applied
    to the model at scale 1 (as ``llama_cpp.Llama(lora_path=...)`` does).
    """
    if not ids:
        return []
    n_ctx = max(64, max(len(s) for s in ids) + 8)
    lm = LlamaModel(path, reference=True, purpose=purpose)
    adapter = None
    try:
        adapter = LlamaLora(lm, lora) if lora is not None else None
        ctx = LlamaContext(lm, 1, n_ctx, n_ctx, threads, n_ubatch=n_ctx, reference=True)
        try:
            if adapter is not None:
                ctx.set_lora(adapter, 1.0)
            out: list[np.ndarray] = []
            for seq in ids:
                ctx.clear()
                got = ctx.decode([(int(t), j, 0, True) for j, t in enumerate(seq)])
                out.append(np.stack([got[j] for j in range(len(seq))]).astype(np.float32, copy=False))
        finally:
            ctx.close()
    finally:
        if adapter is not None:
            adapter.close()
        lm.close()
    return out


# -- ggml's own row (de)quantisers (llama-cpp-python's libggml-base, through ctypes) -------------

_GGML_BASE: list[Any] = []  # [the library, or None where llama-cpp-python is not installed], loaded once


def _ggml_base() -> Any:
    """libggml-base from the llama_cpp package (found without importing it), or None."""
    if not _GGML_BASE:
        lib = None
        try:
            spec = importlib.util.find_spec("llama_cpp")
            if spec is not None and spec.submodule_search_locations:
                root = Path(list(spec.submodule_search_locations)[0]) / "lib"
                for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
                    if (root / name).is_file():
                        lib = ctypes.CDLL(str(root / name))
                        break
        except (OSError, ImportError, ValueError):
            lib = None
        _GGML_BASE.append(lib)
    return _GGML_BASE[0]


def ggml_has(routine: str) -> bool:
    """Whether libggml-base is installed and exports ``routine``."""
    lib = _ggml_base()
    return lib is not None and hasattr(lib, routine)


def ggml_dequantize(byte_rows: np.ndarray, type_name: str, n_cols: int) -> np.ndarray | None:
    """ggml's ``dequantize_row_<type>`` over ``(n_rows, row_bytes)`` uint8 rows of GGML type ``type_name``:
    float32 ``(n_rows, n_cols)`` (10x to 40x gguf-py's numpy, and it releases the GIL), or None where
    the library or the routine is missing."""
    name = "dequantize_row_" + type_name.lower().replace("_k", "_K")
    if not ggml_has(name):
        return None
    fn = getattr(_ggml_base(), name)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    src = np.ascontiguousarray(byte_rows)
    out = np.empty((src.shape[0], n_cols), dtype=np.float32)
    step = max(1, (1 << 24) // max(1, n_cols))  # 16 Mi values per call
    for r0 in range(0, src.shape[0], step):
        r1 = min(src.shape[0], r0 + step)
        fn(src[r0:r1].ctypes.data, out[r0:r1].ctypes.data, (r1 - r0) * n_cols)
    return out


def ggml_quantize(values: np.ndarray, type_id: int, row_bytes: int) -> tuple[np.ndarray, int]:
    """ggml's ``ggml_quantize_chunk`` (no importance matrix) of float32 rows ``(n_rows, n_cols)`` to GGML type
    ``type_id``: uint8 ``(n_rows, row_bytes)`` and the bytes ggml says it wrote. Check :func:`ggml_has` first."""
    fn = _ggml_base().ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    src = np.ascontiguousarray(values, dtype=np.float32)
    out = np.zeros((src.shape[0], row_bytes), dtype=np.uint8)
    written = fn(int(type_id), src.ctypes.data, out.ctypes.data, 0, src.shape[0], src.shape[1], None)
    return out, int(written)


def quantize_gguf(src: str | Path, out: str | Path, ftype: str, threads: int = 2, requantize: bool = False) -> Path:
    """``src`` written to ``out`` by llama.cpp's own quantiser (``llama_model_quantize``) as file type ``ftype``
    (``Q8_0``, ``Q4_K_M``, ``F32``, ...: a ``LLAMA_FTYPE_MOSTLY_*`` / ``LLAMA_FTYPE_ALL_*`` name);
    ``requantize``: allow a quantised source (dequantised first, as llama.cpp's ``--allow-requantize``)."""
    L = llama_module("quantising a GGUF")
    name = ftype.upper()
    code = getattr(L, f"LLAMA_FTYPE_MOSTLY_{name}", None) or getattr(L, f"LLAMA_FTYPE_ALL_{name}", None)
    if code is None:
        raise CnaError(f"llama.cpp has no file type {ftype}")
    params = L.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = code, threads, requantize
    rc = L.llama_model_quantize(str(src).encode("utf-8"), str(out).encode("utf-8"), ctypes.byref(params))
    if rc != 0:
        raise CnaError(f"llama.cpp could not quantise {Path(src).name} to {ftype} (code {rc})")
    return Path(out)
