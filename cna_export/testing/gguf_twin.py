"""GGUF twins of the tiny Hugging Face test models, written the way llama.cpp's converter writes them:
gguf-py's ``GGUFWriter``, tensor names from gguf-py's tensor-name map (``hf_to_gguf_module``), the
fused 3-D expert tensors split into ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, llama's
q/k row permutation, the hyper-parameters llama.cpp reads, and the tiny BPE vocabulary, so
llama-cpp-python loads them. Types: F32, F16 (matrices; norms stay F32), or a llama.cpp file type
such as ``Q4_K_M``: the F32 twin quantised by llama.cpp's own quantiser (``llama_model_quantize``;
gguf-py cannot quantise K-quants), which keeps tensors whose rows are not whole 256-blocks in
Q5_0/F16 as it does for real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# HF model_type -> (llama.cpp architecture, permute q/k rows like convert_hf_to_gguf's LlamaModel)
GGUF_ARCH = {
    "mixtral": ("llama", True),
    "qwen2_moe": ("qwen2moe", False),
    "qwen3_moe": ("qwen3moe", False),
    "olmoe": ("olmoe", False),
    "deepseek_v2": ("deepseek2", False),
    "deepseek_v3": ("deepseek2", False),
    # dense families (issue 13)
    "olmo2": ("olmo2", False),
    "smollm3": ("smollm3", True),
    "ministral3": ("mistral3", True),
    "exaone4": ("exaone4", False),
    "seed_oss": ("seed_oss", False),
    "ernie4_5": ("ernie4_5", False),
    "granite": ("granite", True),
    "glm4": ("glm4", False),
    "cohere2": ("cohere2", False),
    "cohere": ("command-r", False),
    "olmo": ("olmo", False),
    "stablelm": ("stablelm", False),
}


def _permute(w: np.ndarray, n_head: int, n_kv: int | None) -> np.ndarray:
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(folder: Path) -> tuple[list[str], list[str], list[int]]:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    special = {a["content"] for a in data.get("added_tokens", [])}
    types = [3 if t in special else 1 for t in tokens]  # CONTROL / NORMAL
    return tokens, merges, types


def write_gguf_twin(hf: Path, path: Path, qtype: str = "F32") -> Path:
    """Write ``hf`` (a tiny model saved by ``make_tiny_model`` of tests/conftest.py) as a GGUF file llama.cpp
    loads."""
    import torch
    import transformers as tf
    from gguf import GGUFWriter

    if qtype not in ("F32", "F16"):
        import ctypes

        import llama_cpp

        f32 = write_gguf_twin(hf, path.with_name(path.name + ".f32.tmp"), "F32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params))
        f32.unlink()
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantise {hf} to {qtype}")
        return path

    from cna_export.io.weights import hf_to_gguf_module

    cfg = json.loads((hf / "config.json").read_text())
    model_type = cfg["model_type"]
    arch, permute = GGUF_ARCH[model_type]
    n_layers, nh, nkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden = cfg["hidden_size"]
    model = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    expert_ff = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny {model_type}")
    w.add_block_count(n_layers)
    w.add_context_length(cfg.get("max_position_embeddings", 256))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    head_dim = cfg.get("head_dim") or hidden // nh
    if arch != "deepseek2":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(expert_ff)
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch == "granite":  # Granite's multipliers
        w.add_attention_scale(float(cfg["attention_multiplier"]))
        w.add_embedding_scale(float(cfg["embedding_multiplier"]))
        w.add_residual_scale(float(cfg["residual_multiplier"]))
        w.add_logit_scale(float(cfg["logits_scaling"]))
    if arch == "deepseek2":  # multi-head latent attention, dense first layers, shared experts
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        w.add_expert_shared_count(cfg["n_shared_experts"])
        w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
        from gguf import ExpertGatingFuncType

        gating = ExpertGatingFuncType.SIGMOID if model_type == "deepseek_v3" else ExpertGatingFuncType.SOFTMAX
        w.add_expert_gating_func(gating)
        if cfg.get("q_lora_rank"):
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(cfg["kv_lora_rank"])
        w.add_key_length(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        w.add_value_length(cfg["v_head_dim"])
        w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
        if model_type == "deepseek_v3":
            w.add_expert_group_count(cfg.get("n_group", 1))
            w.add_expert_group_used_count(cfg.get("topk_group", 1))
    tokens, merges, types = _vocab(hf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    w.add_pad_token_id(cfg.get("pad_token_id", 0))
    w.add_add_bos_token(False)
    template = hf / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())
    else:
        tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
        if tok_cfg.get("chat_template"):
            w.add_chat_template(tok_cfg["chat_template"])

    def add(name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim == 1 or qtype == "F32":
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data.astype(np.float16))

    for name, data in sd.items():
        module, _, suffix = name.rpartition(".")
        if name.endswith("mlp.gate_up_proj.weight"):  # dense fused gate_up (GLM-4): llama.cpp keeps it fused
            add(f"blk.{int(name.split('.')[2])}.ffn_up.weight", data)
            continue
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate half first
            layer = int(name.split(".")[2])
            half = data.shape[1] // 2
            add(f"blk.{layer}.ffn_gate_exps.weight", data[:, :half])
            add(f"blk.{layer}.ffn_up_exps.weight", data[:, half:])
            continue
        if name.endswith("e_score_correction_bias"):
            add(f"blk.{int(name.split('.')[2])}.exp_probs_b.bias", data)
            continue
        if name.endswith("experts.down_proj"):
            add(f"blk.{int(name.split('.')[2])}.ffn_down_exps.weight", data)
            continue
        g = hf_to_gguf_module(arch, n_layers, module)
        if g is None:
            raise ValueError(f"no GGUF name for {name}")
        gname = f"{g}.{suffix}"
        if permute and ".attn_q." in gname:
            data = _permute(data, nh, nh)
        elif permute and ".attn_k." in gname:
            data = _permute(data, nh, nkv)
        if gname.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(-1)
        add(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
