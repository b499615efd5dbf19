"""npukit.hub: the real download code against a fake Hugging Face Hub on 127.0.0.1 (tests/hub_fixture.py)."""

import json
import os
import shutil
import socket
import sys
import traceback
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from safetensors.numpy import load_file, save

from npukit import hub as npuhub
from npukit.hub import (
    HubAuthError,
    HubConnectionError,
    MissingPackageError,
    NotAModelFolderError,
    NotCachedError,
    NotEnoughDiskError,
    NotWritableError,
    RepoNotFoundError,
    describe_sources,
    download,
)
from tests.hub_fixture import FakeHub

REPO = "npukit-test/tiny-model"
GATED = "npukit-test/gated-model"
DOWN = "npukit-test/hub-down"
SECRET = "hf_SECRETtokenValue1234567890"
WEIGHTS = {"model.embed_tokens.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}


def _files(version: int) -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8, "version": version}).encode(),
        "model.safetensors": save({k: v * version for k, v in WEIGHTS.items()}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": json.dumps({"eos_token": "</s>"}).encode(),
        "pytorch_model.bin": b"\0" * 64 * 1024,  # the duplicate weights users skip with allow_patterns
        "README.md": b"# tiny\n",
    }


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    """No env from the machine; the default HF cache, token and offline flag live under tmp_path."""
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "OPENMIND_HUB_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # NOTE: huggingface_hub reads these at import time, so patch its constants rather than the environment.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))


@pytest.fixture
def hub():
    with FakeHub() as fake:
        fake.shas = fake.add_repo(REPO, {"main": _files(2), "v1.0": _files(1)})
        fake.add_repo(GATED, {"main": _files(1)}, token=SECRET)
        fake.add_repo(DOWN, {"main": _files(1)}, broken=True)
        yield fake


@pytest.fixture
def closed_port_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def _get(hub, repo_id=REPO, **kwargs):
    return download(repo_id, endpoint=hub.endpoint, progress=False, **kwargs)


def _assert_model_files(path: Path, version: int):
    assert json.loads((path / "config.json").read_text())["version"] == version
    np.testing.assert_array_equal(load_file(path / "model.safetensors")["model.embed_tokens.weight"],
                                  WEIGHTS["model.embed_tokens.weight"] * version)


# -- successful downloads ---------------------------------------------------------------------------------------------


def test_download_to_cache(hub):
    path = _get(hub)
    assert path == Path(constants.HF_HUB_CACHE) / "models--npukit-test--tiny-model" / "snapshots" / hub.shas["main"]
    assert sorted(p.name for p in path.iterdir()) == sorted(_files(2))
    _assert_model_files(path, version=2)
    assert sorted(hub.downloads()) == sorted(_files(2))


def test_download_to_local_dir(hub, tmp_path):
    target = tmp_path / "models" / "tiny-model"
    path = _get(hub, local_dir=target)
    assert path == target.resolve()
    assert not (path / "model.safetensors").is_symlink()
    _assert_model_files(path, version=2)


def test_allow_patterns_fetches_only_matching_files(hub):
    path = _get(hub, allow_patterns=["*.json", "*.safetensors"])
    expected = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in path.iterdir()) == expected
    assert sorted(hub.downloads()) == expected  # pytorch_model.bin and README.md never left the server


def test_ignore_patterns(hub):
    path = _get(hub, ignore_patterns=["*.bin", "*.md"])
    assert sorted(hub.downloads()) == sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("revision", ["v1.0", "sha"])
def test_revision_is_pinned(hub, revision):
    revision = hub.shas["v1.0"] if revision == "sha" else revision
    path = _get(hub, revision=revision)
    assert path.name == hub.shas["v1.0"]
    _assert_model_files(path, version=1)


def test_endpoint_argument_beats_hf_endpoint_env(hub, monkeypatch, closed_port_endpoint):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    path = download(REPO, progress=False)  # endpoint taken from HF_ENDPOINT, read at call time
    _assert_model_files(path, version=2)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint)
    assert download(REPO, endpoint=hub.endpoint, revision="v1.0", progress=False).name == hub.shas["v1.0"]


def test_progress_bars(hub, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled

    download(REPO, endpoint=hub.endpoint, allow_patterns="config.json", progress=False)
    assert "Fetching" not in capsys.readouterr().err
    download(REPO, endpoint=hub.endpoint, allow_patterns="*.json", progress=True)
    if not are_progress_bars_disabled():  # HF_HUB_DISABLE_PROGRESS_BARS=1 turns them off everywhere
        assert "Fetching 3 files" in capsys.readouterr().err


# -- offline and cache ------------------------------------------------------------------------------------------------


def test_second_call_offline_uses_the_cache(hub, monkeypatch, closed_port_endpoint):
    first = _get(hub)
    seen = len(hub.requests)
    assert download(REPO, offline=True, endpoint=closed_port_endpoint, progress=False) == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download(REPO, progress=False) == first
    assert len(hub.requests) == seen  # no request at all


def test_offline_local_dir(hub, tmp_path):
    target = tmp_path / "models" / "tiny-model"
    _get(hub, local_dir=target)
    assert download(REPO, local_dir=target, offline=True) == target.resolve()


def test_offline_with_empty_cache_says_how_to_get_the_model(hub):
    with pytest.raises(NotCachedError) as info:
        _get(hub, offline=True)
    message = str(info.value)
    assert f"'{REPO}' is not cached in {constants.HF_HUB_CACHE}" in message
    assert "offline mode is on" in message and "copy that folder here" in message
    assert "local_dir='~/models/tiny-model'" in message and "pass its path" in message
    assert hub.requests == []


def test_hub_unreachable_falls_back_to_the_cache(hub, closed_port_endpoint):
    first = _get(hub)
    assert download(REPO, endpoint=closed_port_endpoint, progress=False) == first


def test_offline_download_needs_the_whole_snapshot(hub, tmp_path):
    """(Was a test of hub.cached_path, a test-only helper: the same cache semantics through download.)"""
    with pytest.raises(NotCachedError):
        _get(hub, offline=True)
    path = _get(hub, allow_patterns="*.json")
    assert _get(hub, allow_patterns="*.json", offline=True) == path
    with pytest.raises(NotCachedError):  # the weights were not downloaded: the snapshot is incomplete
        _get(hub, offline=True)
    with pytest.raises(NotCachedError):
        _get(hub, revision="v1.0", offline=True)
    _get(hub)
    assert _get(hub, offline=True) == path


# -- errors -----------------------------------------------------------------------------------------------------------


def test_repo_not_found(hub):
    with pytest.raises(RepoNotFoundError) as info:
        _get(hub, "npukit-test/no-such-model")
    message = str(info.value)
    assert f"'npukit-test/no-such-model' was not found on {hub.endpoint}" in message
    assert "hf auth login" in message and "token=" in message


def test_revision_not_found(hub):
    with pytest.raises(RepoNotFoundError, match="Revision 'v9.9' does not exist in 'npukit-test/tiny-model'"):
        _get(hub, revision="v9.9")


def test_invalid_repo_id(hub):
    with pytest.raises(RepoNotFoundError, match="neither an existing folder nor a valid repo id"):
        _get(hub, "bad id with spaces")


@pytest.mark.parametrize("token", [None, SECRET[:-1] + "X"])
def test_gated_repo_error_never_shows_the_token(hub, token):
    with pytest.raises(HubAuthError) as info:
        _get(hub, GATED, token=token)
    message = str(info.value)
    assert f"'{GATED}' is gated" in message and "hf auth login" in message and "token=" in message
    assert ("a token was passed" in message) == (token is not None)
    if token is not None:
        assert any(r.authorization == f"Bearer {token}" for r in hub.requests)  # it was sent...
        shown = "".join(traceback.format_exception(info.value))  # ...but not shown, not even in the chained errors
        assert token not in shown and token[6:20] not in shown


def test_invalid_token_is_refused_and_not_shown(hub):
    hub.valid_tokens = {SECRET}
    typo = SECRET.replace("SECRET", "SECRTE")
    with pytest.raises(HubAuthError) as info:
        _get(hub, token=typo)
    message = str(info.value)
    assert f"{hub.endpoint} refused access to '{REPO}' (HTTP 401/403)" in message
    assert "a token was passed: check that it is valid" in message
    assert typo not in "".join(traceback.format_exception(info.value))


def test_gated_repo_with_the_right_token(hub):
    _assert_model_files(_get(hub, GATED, token=SECRET), version=1)


def test_hub_down_is_reported_as_unreachable(hub):
    with pytest.raises(HubConnectionError, match="the server answered HTTP 500"):
        _get(hub, DOWN)


def test_endpoint_unreachable(closed_port_endpoint):
    with pytest.raises(HubConnectionError) as info:
        download(REPO, endpoint=closed_port_endpoint, progress=False)
    message = str(info.value)
    assert f"Cannot reach {closed_port_endpoint}" in message and "cannot connect" in message
    assert "HF_ENDPOINT=https://hf-mirror.com" in message and "offline=True" in message


def test_unwritable_folder_suggests_home(hub, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes through chmod; make os.access answer like it does for a normal user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked
                            else real_access(p, mode, **kw))
    try:
        with pytest.raises(NotWritableError) as info:
            _get(hub, local_dir=locked / "tiny-model")
    finally:
        locked.chmod(0o700)
    message = str(info.value)
    assert f"Cannot write to {locked}" in message
    assert f"$HOME = {Path.home()}" in message and "local_dir='~/models/tiny-model'" in message
    assert hub.requests == []  # checked before any network traffic


def test_not_enough_disk_space(hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 1024, 1024))
    total = sum(len(data) for data in _files(2).values())
    with pytest.raises(NotEnoughDiskError) as info:
        _get(hub)
    message = str(info.value)
    assert f"need {total / 1024:.1f} KiB" in message and "only 1.0 KiB free" in message
    assert "allow_patterns" in message
    assert hub.downloads() == []  # nothing was fetched
    # with only the small files selected, the same free space is enough
    _get(hub, allow_patterns=["config.json", "tokenizer_config.json"])


def test_disk_check_counts_only_files_not_yet_cached(hub, monkeypatch):
    _get(hub, allow_patterns="*.json")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 1024, 1024))
    path = _get(hub, ignore_patterns=["*.bin", "*.safetensors", "*.md"])  # all cached: needs 0 bytes
    assert (path / "tokenizer.json").is_file()


# -- local folders ----------------------------------------------------------------------------------------------------


def test_local_folder(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert download(str(folder)) == folder.resolve()
    assert download(str(folder), source="local") == folder.resolve()


def test_local_folder_without_config(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotAModelFolderError, match=r"has no config.json.*holds: model.safetensors.*cp -rL"):
        download(str(folder))
    with pytest.raises(NotAModelFolderError, match="is not an existing folder"):
        download(str(tmp_path / "missing"), source="local")
    with pytest.raises(NotAModelFolderError, match="is not an existing folder"):
        download("./no/such/folder")


def test_unknown_source():
    with pytest.raises(ValueError, match="source='hugginface' is not one of"):
        download(REPO, source="hugginface")


# -- optional sources -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, module, install", [
    ("openmind", "openmind_hub", 'pip install "npukit[openmind]"'),
    ("modelscope", "modelscope", "pip install modelscope"),
])
def test_optional_source_without_its_package(monkeypatch, source, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail, installed or not
    with pytest.raises(MissingPackageError) as info:
        download(REPO, source=source)
    assert f"source={source!r} needs the {module} package" in str(info.value)
    assert install in str(info.value)


def test_openmind_glue_passes_endpoint_and_supported_options(monkeypatch, tmp_path, caplog):
    calls = []

    def snapshot_download(repo_id, *, revision=None, local_dir=None, endpoint=None, token=None):
        calls.append(dict(repo_id=repo_id, revision=revision, local_dir=local_dir, endpoint=endpoint, token=token))
        return local_dir

    monkeypatch.setitem(sys.modules, "openmind_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("OPENMIND_HUB_ENDPOINT", "https://hub.gitcode.com")
    path = download("org/model", source="openmind", revision="main", local_dir=tmp_path / "m",
                    allow_patterns="*.json")  # allow_patterns is not accepted by this fake, so it is dropped
    assert path == tmp_path / "m"
    assert calls == [dict(repo_id="org/model", revision="main", local_dir=str(tmp_path / "m"),
                          endpoint="https://hub.gitcode.com", token=None)]
    assert "ignores allow_patterns" in caplog.text


def test_openmind_errors_are_explained(monkeypatch):
    class RepositoryNotFoundError(Exception):  # openmind_hub's own class of this name
        pass

    def snapshot_download(repo_id, **kwargs):
        raise RepositoryNotFoundError("404")

    monkeypatch.setitem(sys.modules, "openmind_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(RepoNotFoundError, match="'org/missing' was not found on the openmind hub"):
        download("org/missing", source="openmind")


def test_describe_sources(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    text = describe_sources()
    assert "Endpoint now: https://hf-mirror.com" in text
    assert "OPENMIND_HUB_ENDPOINT" in text and "modelscope" in text and "HF_HUB_OFFLINE" in text
    assert constants.HF_HUB_CACHE in text
    assert npuhub.SOURCES == ("hf", "openmind", "modelscope", "local")


def test_local_dir_that_is_a_file_says_so(hub, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(NotWritableError) as info:
        _get(hub, local_dir=a_file)
    assert "is a file, not a folder" in str(info.value) and "permission" not in str(info.value)
    assert hub.requests == []
