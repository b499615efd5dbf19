from types import SimpleNamespace

import pytest
import torch

import npukit
import npukit.hub  # noqa: F401  (npukit.hub.NotAModelFolderError below; npukit imports it lazily)
from npukit import loading


@pytest.mark.slow
def test_smollm2_answers_paris_greedily(smol):
    model, tok = smol
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    r = model.load_report
    assert r.source == "embedded:smollm2-135m-instruct" and r.dtype == "float32"
    assert 134e6 < r.num_parameters < 136e6 and r.weight_bytes == r.num_parameters * 4


def test_load_report_prints_nicely(tiny):
    model, _ = tiny
    r = model.load_report
    assert r.device == "cpu" and r.dtype == "float32" and "float32 requested" in r.reasons
    text, page = str(r), r._repr_html_()
    assert "embedded:tiny-llama" in text and "load time" in text
    assert page.startswith("<table>") and "tiny-llama" in page


def test_auto_dtype_on_cpu_is_measured_and_explained():
    dtype, reasons = loading.choose_dtype(torch.device("cpu"), "auto")
    assert dtype in (torch.float32, torch.bfloat16)
    assert any("GFLOP/s" in r or "no native bf16" in r for r in reasons)


class FakeNPU(SimpleNamespace):
    """torch.device("npu") needs torch_npu; the dtype logic only reads .type and str()."""

    def __str__(self):
        return "npu:0"


NPU = FakeNPU(type="npu", index=0)


def test_auto_dtype_falls_back_to_fp16_without_bf16(monkeypatch):
    monkeypatch.setattr(loading._device, "supports_dtype",
                        lambda dev, dt: (dt != torch.bfloat16, "ok" if dt != torch.bfloat16 else "310P has no bf16"))
    dtype, reasons = loading.choose_dtype(NPU, "auto")
    assert dtype == torch.float16 and any("fallback: 310P has no bf16" in r for r in reasons)


def test_explicit_dtype_the_device_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(loading._device, "supports_dtype", lambda dev, dt: (False, "no bf16 kernels"))
    with pytest.raises(ValueError, match="not supported on npu:0: no bf16 kernels. Use dtype='float16'"):
        loading.choose_dtype(NPU, "bfloat16")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        loading.parse_dtype("int3")


def test_unknown_model_name_lists_embedded_names():
    with pytest.raises(loading.ModelLoadError, match="smollm2-135m-instruct, tiny-llama"):
        npukit.load_model("smollm3", device="cpu", dtype="float32")


def test_device_npu_without_torch_npu_says_what_to_install():
    with pytest.raises(npukit.device.DeviceError, match="torch_npu"):
        npukit.load_model("tiny-llama", device="npu")


def test_local_folder_without_config_is_refused(tmp_path):
    with pytest.raises(npukit.hub.NotAModelFolderError, match="no config.json, so it is not a model folder"):
        npukit.load_model(str(tmp_path), device="cpu", dtype="float32")


def test_local_folder_loads(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, _ = npukit.load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert m2.dtype == torch.bfloat16 and m2.load_report.source.startswith("local:")
    w1, w2 = model.lm_head.weight, m2.lm_head.weight
    assert torch.equal(w1.to(torch.bfloat16), w2)


@pytest.mark.parametrize("damage", ["config.json", "tokenizer.json", "model.safetensors"])
def test_damaged_model_folder_names_the_file(tmp_path, damage):
    import shutil

    from npukit.samples import sample_path

    folder = tmp_path / "model"
    shutil.copytree(sample_path("tiny-llama"), folder)
    target = folder / damage
    if not target.exists():
        pytest.skip(f"the tiny model has no {damage}")
    target.write_bytes(target.read_bytes()[:40])  # cut short, as an interrupted copy leaves it
    with pytest.raises(loading.ModelLoadError) as info:
        npukit.load_model(folder, device="cpu", dtype="float32")
    assert f"{damage} is damaged" in str(info.value) and "again" in str(info.value)


def test_cpu_matmul_gflops_counts_the_rows_it_multiplies():
    import torch

    from npukit.loading import cpu_matmul_gflops

    one = cpu_matmul_gflops(torch.float32, hidden=64, tokens=1)
    many = cpu_matmul_gflops(torch.float32, hidden=64, tokens=32)
    assert one > 0 and many > 0
