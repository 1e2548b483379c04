import json

from predictors.demo_model import digest, ensure_demo_model, write_demo_model


def test_demo_model_is_byte_identical_every_run(tmp_path):
    a = write_demo_model(tmp_path / "a")
    b = write_demo_model(tmp_path / "b")
    assert digest(a) == digest(b)
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)


def test_demo_model_shape_fits_cpu_attention(tmp_path):
    config = json.loads((write_demo_model(tmp_path) / "config.json").read_text())
    # vLLM's CPU attention rejects head_dim 16.
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["head_dim"] == 64
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_demo_tokenizer_round_trips_and_has_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(write_demo_model(tmp_path)))
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|begin_of_text|><|user|>hi\n<|assistant|>"


def test_ensure_demo_model_reuses_a_complete_copy(tmp_path):
    first = ensure_demo_model(tmp_path / "m")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_demo_model(tmp_path / "m")
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
