"""The embedded demo model: a tiny Llama generated locally, never downloaded.

Random weights from a fixed seed and a byte-level BPE tokenizer trained on a built-in corpus, so the
same files come out on every machine and greedy output is reproducible. Its text is gibberish by design:
it exists so every protocol path can be tested token-exact on CPU. Beside it, in ``lora/``, a demo LoRA
adapter in PEFT's layout (rank 8 on the attention projections, weights from a fixed seed), strong enough
that greedy output through it differs from the base model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# head_dim must be 64: vLLM's CPU attention rejects 16.
HIDDEN = 128
HEADS = 2
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 512
MAX_POSITIONS = 2048
SEED = 20261127
# Bump when anything below changes, so cached copies are regenerated.
DEMO_VERSION = "1"
# The demo adapter: its own version (a new adapter must not move the model, whose path keys vLLM's
# compile cache), rank and seed.
ADAPTER_DIR = "lora"
ADAPTER_VERSION = "1"
ADAPTER_RANK = 8
ADAPTER_ALPHA = 16
ADAPTER_SEED = 20261128
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]
BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|{{ message['role'] }}|>{{ content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = """
Serverless inference scales a model to zero when no request arrives and back up when traffic returns.
An event driven system routes CloudEvents from a broker to triggers and on to subscribers.
The quick brown fox jumps over the lazy dog while the model server answers every request.
Kubernetes schedules pods onto nodes; Knative scales revisions by concurrency and requests per second.
A batch job splits its input into chunks, and each chunk is processed exactly once by some replica.
Large language models generate text one token at a time, attending to every token that came before.
The tokenizer turns text into numbers, and the detokenizer turns the numbers back into text.
Hello world! How are you today? I am a tiny model with random weights and a small vocabulary.
Priority scheduling lets online traffic run ahead of background work on the same engine.
Once upon a time there was a cluster with four GPUs, a broker, and a queue of patient events.
"""


def _corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    # Repeat with variations so BPE sees enough pair statistics for a 512-token vocabulary.
    extra = [f"{a} {b}" for a in lines for b in lines[:3]]
    digits = [" ".join(str(i * j) for j in range(12)) for i in range(20)]
    return lines + extra + digits


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Any: tokenizers' stubs type BpeTrainer in some patch releases and not in others (strict mypy).
    bpe_trainer: Any = trainers.BpeTrainer
    trainer = bpe_trainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str(pretty=True)


def _weights(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab, HIDDEN, std=1.0)}
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * head_dim, HIDDEN, std=0.08)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN, std=0.08)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN, std=0.08)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * head_dim, std=0.08)
        w[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN, std=0.08)
        w[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN, std=0.08)
        w[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE, std=0.08)
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    w["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    # A wide lm_head gives well-separated logits, so greedy argmax does not flip between batch shapes.
    w["lm_head.weight"] = normal(vocab, HIDDEN, std=0.5)
    return w


def write_demo_model(directory: str | os.PathLike[str]) -> Path:
    """Write the demo model into ``directory`` (created if needed) and return its path."""
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tokenizer_json()
    vocab = len(json.loads(tokenizer_json)["model"]["vocab"])
    (out / "tokenizer.json").write_text(tokenizer_json)
    ids = {t: json.loads(tokenizer_json)["model"]["vocab"].get(t) for t in SPECIAL_TOKENS}
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]}
    ids.update(added)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": vocab,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    save_file(_weights(vocab), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_demo_adapter(out / ADAPTER_DIR)
    (out / "EVLLM_DEMO_VERSION").write_text(DEMO_VERSION + "\n")
    return out


def _adapter_weights() -> dict[str, np.ndarray]:
    """PEFT's tensor names (``base_model.model.<module>.lora_A/B.weight``; A is [r, in], B is [out, r]).
    B is not zero (as PEFT initialises it) but random: a trained adapter's delta, large enough to move
    the greedy argmax."""
    rng = np.random.default_rng(ADAPTER_SEED)
    head_dim = HIDDEN // HEADS
    shapes = {  # module -> (in, out)
        "q_proj": (HIDDEN, HEADS * head_dim),
        "k_proj": (HIDDEN, KV_HEADS * head_dim),
        "v_proj": (HIDDEN, KV_HEADS * head_dim),
        "o_proj": (HEADS * head_dim, HIDDEN),
    }
    w: dict[str, np.ndarray] = {}
    for i in range(LAYERS):
        for module in ADAPTER_TARGETS:
            fan_in, fan_out = shapes[module]
            p = f"base_model.model.model.layers.{i}.self_attn.{module}."
            w[p + "lora_A.weight"] = rng.normal(0.0, 0.15, size=(ADAPTER_RANK, fan_in)).astype(np.float32)
            w[p + "lora_B.weight"] = rng.normal(0.0, 0.15, size=(fan_out, ADAPTER_RANK)).astype(np.float32)
    return w


def write_demo_adapter(directory: str | os.PathLike[str], base_model: str = "evllm-demo") -> Path:
    """Write the demo LoRA adapter (PEFT layout) into ``directory`` and return its path."""
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": ADAPTER_RANK,
        "lora_alpha": ADAPTER_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(ADAPTER_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(_adapter_weights(), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "EVLLM_ADAPTER_VERSION").write_text(ADAPTER_VERSION + "\n")
    return out


def adapter_dir(model_directory: str | os.PathLike[str]) -> Path:
    """Where the demo adapter lives: ``lora/`` inside the demo model's directory."""
    return Path(model_directory) / ADAPTER_DIR


def ensure_demo_adapter(model_directory: str | os.PathLike[str]) -> Path:
    """Return the demo adapter of a demo model directory, generating it once (atomically) if missing."""
    target = adapter_dir(ensure_demo_model(model_directory))
    marker = target / "EVLLM_ADAPTER_VERSION"
    if marker.exists() and marker.read_text().strip() == ADAPTER_VERSION:
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    write_demo_adapter(tmp)
    import shutil

    shutil.rmtree(target, ignore_errors=True)  # an older version's
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return target


def demo_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where `evllm serve --model_dir demo` keeps the generated demo model (``--cache_dir``)."""
    return Path(cache_dir) / f"demo-model-v{DEMO_VERSION}"


def ensure_demo_model(directory: str | os.PathLike[str]) -> Path:
    """Return a ready demo model directory, generating it once (atomically) if missing."""
    target = Path(directory)
    marker = target / "EVLLM_DEMO_VERSION"
    if marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        return target
    # Write beside and rename, so a concurrent reader never sees half a model.
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    write_demo_model(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process won the race; its copy is identical.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def digest(directory: str | os.PathLike[str]) -> str:
    """sha256 over every file of a model directory (its adapter too), to show generation is
    byte-identical."""
    h = hashlib.sha256()
    root = Path(directory)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()
