"""Download model repos from the Hugging Face Hub (or a mirror), the openMind hub, ModelScope, or use a local folder.

    path = download("Qwen/Qwen2.5-0.5B-Instruct")                         # HF, or the mirror in HF_ENDPOINT
    path = download("Qwen/Qwen2.5-0.5B-Instruct", endpoint="https://hf-mirror.com",
                    local_dir="~/models/Qwen2.5-0.5B-Instruct")
    path = download("Qwen/Qwen2.5-0.5B-Instruct", offline=True)           # from the cache only, no network
    model, tokenizer = npukit.load_model(path)

Every failure that has a known cause raises a `HubError` subclass whose message says what to do next.
`describe_sources()` explains the sources, mirrors and environment variables.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = ("hf", "openmind", "modelscope", "local")
HF_MIRROR = "https://hf-mirror.com"

# source -> (importable module, install command)
_OPTIONAL_PACKAGES = {
    "openmind": ("openmind_hub", 'pip install "npukit[openmind]"   (or: pip install openmind_hub)'),
    "modelscope": ("modelscope", "pip install modelscope"),
}


class HubError(RuntimeError):
    """A model could not be fetched; the message says what to do about it."""


class NotCachedError(HubError):
    """Offline (or the hub is unusable) and the model is not in the local cache."""


class HubConnectionError(HubError):
    """The endpoint cannot be reached (no network, firewall, wrong HF_ENDPOINT, hub down)."""


class RepoNotFoundError(HubError):
    """The repo id or revision does not exist there (or the repo is private)."""


class HubAuthError(HubError):
    """Gated repo, or the token was refused (HTTP 401 / 403)."""


class NotWritableError(HubError):
    """The target folder cannot be written."""


class NotEnoughDiskError(HubError):
    """Free disk space is smaller than the files to download."""


class MissingPackageError(HubError):
    """The optional package for this source is not installed."""


class NotAModelFolderError(HubError):
    """A local path that is not a model folder (no config.json)."""


@dataclass
class _Ctx:
    """What an error message needs to know about the download that failed."""

    repo_id: str
    source: str
    endpoint: str | None
    revision: str | None
    token: str | bool | None
    target: Path | None  # where files are written: local_dir, or the cache folder


def download(
    repo_id: str | os.PathLike,
    *,
    source: str = "hf",
    revision: str | None = None,
    endpoint: str | None = None,
    local_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: str | list[str] | None = None,
    ignore_patterns: str | list[str] | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> Path:
    """Fetch a model repo and return the local folder that holds its files.

    `repo_id` is a hub id ("org/name") or an existing local folder (returned as is after checking it has a
    config.json). `source`: "hf" (Hugging Face Hub; endpoint = `endpoint` > $HF_ENDPOINT > huggingface.co),
    "openmind" (openMind hub; $OPENMIND_HUB_ENDPOINT), "modelscope", or "local". `local_dir` writes plain files
    there; otherwise the hub's cache is used (`cache_dir`, default $HF_HOME/hub). `offline` (default:
    $HF_HUB_OFFLINE) resolves from the cache only. `token`: a string, True (use the saved login) or None.
    `progress` shows download bars (source="hf"; the other hubs show their own).
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {SOURCES}.")
    repo_id = os.fspath(repo_id)
    folder = Path(repo_id).expanduser()
    if source == "local" or folder.is_dir() or repo_id.startswith(("/", "./", "../", "~")):
        return check_model_folder(folder)
    local_dir = Path(local_dir).expanduser() if local_dir is not None else None
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
    options = dict(
        revision=revision, endpoint=endpoint, local_dir=local_dir, cache_dir=cache_dir,
        allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, token=token, offline=offline,
        progress=progress,
    )
    if source == "hf":
        return _download_hf(repo_id, **options)
    return _download_optional(repo_id, source=source, **options)


def describe_sources() -> str:
    """Where models can come from, the mirror to use in mainland China, and the current settings."""
    from huggingface_hub import constants

    def installed(source: str) -> str:
        module, install = _OPTIONAL_PACKAGES[source]
        return "installed" if importlib.util.find_spec(module) is not None else f"not installed: {install}"

    hf_endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    om_endpoint = os.environ.get("OPENMIND_HUB_ENDPOINT") or "package default (https://modelers.cn)"
    offline = "on" if _hf_offline() else "off"
    return "\n".join([
        "Model sources for npukit.hub.download(repo_id, source=...):",
        f"  hf          Hugging Face Hub. Endpoint now: {hf_endpoint}",
        f"              Mirror for mainland China: export HF_ENDPOINT={HF_MIRROR}  (or endpoint=...).",
        "              Gated/private repos: `hf auth login` (or `huggingface-cli login`), or token=...",
        f"  openmind    openMind hub (Modelers, GitCode), {installed('openmind')}.",
        f"              Endpoint now: {om_endpoint}  (OPENMIND_HUB_ENDPOINT; GitCode: https://hub.gitcode.com)",
        f"  modelscope  ModelScope, {installed('modelscope')}.",
        "  local       A folder with config.json, weights (*.safetensors) and tokenizer files.",
        f"Cache: {constants.HF_HUB_CACHE} (set HF_HOME, or pass cache_dir= / local_dir=).",
        f"Offline mode (HF_HUB_OFFLINE=1 or offline=True): {offline}; it uses only what is already cached.",
        "No network here? Download on a machine that has it, copy the folder, and pass its path.",
    ])


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub (and mirrors such as hf-mirror.com, which serve the same HTTP API)


def _download_hf(repo_id, *, revision, endpoint, local_dir, cache_dir, allow_patterns, ignore_patterns, token,
                 offline, progress) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # NOTE: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import; read them again here so that
    # setting them in a notebook cell takes effect, and pass the endpoint explicitly.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    offline = _hf_offline() if offline is None else offline
    target = local_dir or cache_dir or Path(constants.HF_HUB_CACHE)
    ctx = _Ctx(repo_id, "hf", endpoint, revision, token, target)
    fetch = dict(
        repo_id=repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir, local_dir=local_dir,
        allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, token=token,
    )
    silent = _silent_tqdm()

    if offline:
        with _explained(ctx):
            try:
                return Path(snapshot_download(**fetch, local_files_only=True, tqdm_class=silent))
            except LocalEntryNotFoundError as e:
                raise NotCachedError(_not_cached_message(ctx, "offline mode is on")) from e

    _check_writable(target, ctx)
    with _explained(ctx):
        # NOTE: dry_run came with huggingface_hub 1.x; with an older one the disk-space check is skipped.
        if "dry_run" in inspect.signature(snapshot_download).parameters:
            from huggingface_hub.errors import DryRunError

            try:
                # Lists the files that would be downloaded, with their sizes, without downloading them.
                plan = snapshot_download(**fetch, dry_run=True, tqdm_class=silent)
            except DryRunError as e:
                # NOTE: the hub could not be used (no network, auth, not found, hub down). Like huggingface_hub,
                # fall back to a cached copy, but without asking the hub again: a blocked endpoint costs one
                # timeout, not two.
                hub_error = e.__cause__ or e
                try:
                    path = snapshot_download(**fetch, local_files_only=True, tqdm_class=silent)
                except LocalEntryNotFoundError:
                    raise hub_error from None
                logger.warning("%s could not be used (%s); using the cached copy in %s",
                               endpoint, type(hub_error).__name__, path)
                return Path(path)
            _check_disk_space(sum(f.file_size or 0 for f in plan if f.will_download), target, ctx)
        return Path(snapshot_download(**fetch, tqdm_class=None if progress else silent))


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _silent_tqdm():
    from huggingface_hub.utils import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


# ---------------------------------------------------------------------------------------------------------------
# openMind hub and ModelScope: optional packages with a snapshot_download of their own.
# NOTE: these paths are not tested against the real services (no network in CI); tests cover the glue only.


def _download_optional(repo_id, *, source, revision, endpoint, local_dir, cache_dir, allow_patterns,
                       ignore_patterns, token, offline, progress) -> Path:
    module_name, install = _OPTIONAL_PACKAGES[source]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingPackageError(
            f"source={source!r} needs the {module_name} package, which is not installed. Install it with:\n"
            f"    {install}\n"
            + ("(openmind_hub pins requests==2.32.2; use a separate environment if that conflicts.)\n"
               if source == "openmind" else "")
            + f"Or use source='hf' with a mirror: HF_ENDPOINT={HF_MIRROR}."
        ) from e
    if source == "openmind":
        endpoint = endpoint or os.environ.get("OPENMIND_HUB_ENDPOINT")
    ctx = _Ctx(repo_id, source, endpoint, revision, token, local_dir or cache_dir)
    if ctx.target is not None:
        _check_writable(ctx.target, ctx)
    wanted = dict(
        revision=revision, endpoint=endpoint, local_dir=local_dir and str(local_dir),
        cache_dir=cache_dir and str(cache_dir), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
        token=token, local_files_only=offline or None,
    )
    # NOTE: both packages follow huggingface_hub's names; pass only what the installed version accepts.
    wanted = {k: v for k, v in wanted.items() if v is not None}
    kwargs = _accepted(module.snapshot_download, wanted)
    if dropped := sorted(set(wanted) - set(kwargs)):
        logger.warning("this %s version ignores %s; upgrade it to use them", module_name, ", ".join(dropped))
    with _explained(ctx):
        return Path(module.snapshot_download(repo_id, **kwargs))


def _accepted(fn, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


# ---------------------------------------------------------------------------------------------------------------
# Local folders, permissions, disk space


def check_model_folder(folder: Path) -> Path:
    """The folder itself if it holds a model (config.json), else NotAModelFolderError saying what to copy."""
    if not folder.is_dir():
        raise NotAModelFolderError(
            f"{folder} is not an existing folder. Pass a hub id like 'Qwen/Qwen2.5-0.5B-Instruct', or the path of "
            "a folder that holds config.json, the weights (*.safetensors) and the tokenizer files."
        )
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise NotAModelFolderError(
            f"{folder} has no config.json, so it is not a model folder (it holds: {', '.join(found) or 'nothing'}). "
            "Copy the whole model folder: config.json, *.safetensors, tokenizer.json / tokenizer_config.json. "
            "From a Hugging Face cache, copy models--org--name/snapshots/<hash>/ with `cp -rL` (its files are "
            "symlinks)."
        )
    return folder.resolve()


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(target: Path, ctx: _Ctx) -> None:
    base = _existing_parent(target)
    if not base.is_dir():
        raise NotWritableError(f"{base} is a file, not a folder, so {ctx.repo_id!r} cannot be saved under {target}. "
                               "Pass a folder as local_dir (an existing one, or a new path to create).")
    if not os.access(base, os.W_OK | os.X_OK):
        raise NotWritableError(_not_writable_message(ctx, base))


def _check_disk_space(needed: int, target: Path, ctx: _Ctx) -> None:
    base = _existing_parent(target)
    free = shutil.disk_usage(base).free
    if needed > free:
        raise NotEnoughDiskError(
            f"Not enough disk space for {ctx.repo_id!r}: the files to download need {_size(needed)}, but {base} "
            f"has only {_size(free)} free. Free some space, download to a bigger disk (local_dir=... or "
            "cache_dir=..., or HF_HOME), or fetch fewer files with allow_patterns, e.g. "
            "['*.json', '*.safetensors', 'tokenizer*'] to skip duplicate *.bin / *.pth / *.gguf weights."
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------------
# Turning library exceptions into actionable HubErrors


@contextlib.contextmanager
def _explained(ctx: _Ctx):
    """Re-raise known failures of the hub libraries as HubError subclasses; leave unknown ones alone."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        err = _explain(e, ctx)
        if err is None:
            raise
        raise err from e


def _explain(exc: BaseException, ctx: _Ctx) -> HubError | None:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain
                   if getattr(getattr(e, "response", None), "status_code", None) is not None), None)
    where = ctx.endpoint or f"the {ctx.source} hub"
    # NOTE: messages never include the token: only whether one was passed.

    if names & {"GatedRepoError", "AccessWhiteListError"}:
        return HubAuthError(_auth_message(ctx, gated=True))
    if names & {"RevisionNotFoundError", "NoValidRevisionError"}:
        return RepoNotFoundError(
            f"Revision {ctx.revision!r} does not exist in {ctx.repo_id!r} on {where}. Use a branch (e.g. 'main'), "
            "a tag, or a full 40-character commit hash from the repo's 'Files and versions' page."
        )
    if names & {"RepositoryNotFoundError", "NotExistError"}:
        return RepoNotFoundError(
            f"{ctx.repo_id!r} was not found on {where}. Check the id: it is 'org/name' and case-sensitive (e.g. "
            "'Qwen/Qwen2.5-0.5B-Instruct'). If the repo is private or gated, log in with `hf auth login` (or "
            "`huggingface-cli login`) or pass token=...; " + _token_note(ctx) + " A mirror may also not carry it."
        )
    if status in (401, 403):
        return HubAuthError(_auth_message(ctx, gated=False))
    if "OfflineModeIsEnabled" in names:
        return NotCachedError(_not_cached_message(
            ctx, "huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported; restart the "
                 "kernel without it to go online)"))
    if "FileMetadataError" in names:
        return HubConnectionError(
            f"{where} answered, but not like a Hugging Face hub (file metadata headers are missing), and "
            f"{ctx.repo_id!r} is not in the local cache. Check HF_ENDPOINT / endpoint= (a mirror such as "
            f"{HF_MIRROR}), and any proxy or captive portal in between."
        )
    if names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout", "ProxyError", "NetworkError",
                "ConnectTimeout", "ReadTimeout", "TimeoutError"}:
        return HubConnectionError(_no_network_message(ctx, "cannot connect"))
    if status is not None and status >= 500:
        return HubConnectionError(_no_network_message(
            ctx, f"the server answered HTTP {status}: down or overloaded, retry later"))
    if "LocalEntryNotFoundError" in names:
        return NotCachedError(_not_cached_message(ctx, "the hub could not be used"))
    if "HFValidationError" in names or "OMValidationError" in names:
        return RepoNotFoundError(
            f"{ctx.repo_id!r} is neither an existing folder nor a valid repo id. Repo ids look like 'org/name' "
            "(letters, digits, '-', '_', '.'); local folders must exist (check the path with `ls`)."
        )
    return _explain_local(chain, ctx)


def _explain_local(chain: list[BaseException], ctx: _Ctx) -> HubError | None:
    """The errors of this machine in an exception chain: a folder we may not write to, a full disk."""
    name = ctx.repo_id.rsplit("/", 1)[-1]
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return NotWritableError(_not_writable_message(ctx, Path(e.filename) if e.filename else ctx.target))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return NotEnoughDiskError(
                f"The disk filled up while downloading {ctx.repo_id!r} to {ctx.target}. Free some space or pass "
                f"local_dir= on a bigger disk (e.g. local_dir='~/models/{name}'), then run again: finished files "
                "are kept."
            )
        if isinstance(e, ValueError) and "WHITE_LIST_PATHS" in str(e):
            return NotWritableError(
                f"openmind_hub refuses to write to {ctx.target}: it only writes under $HOME, /tmp or the folders "
                f"in HUB_WHITE_LIST_PATHS. Use local_dir='~/models/{name}', or set HUB_WHITE_LIST_PATHS=<folder> "
                "before openmind_hub is imported (restart the kernel)."
            )
    return None


def _token_note(ctx: _Ctx) -> str:
    if isinstance(ctx.token, str):
        return "a token was passed: check that it is valid and can read this repo."
    if ctx.token is True:
        return "the saved login token was used: check that it is still valid."
    if ctx.token is False:
        return "token=False, so no token was sent."
    return "no token was passed (a saved login or HF_TOKEN is used when present)."


def _auth_message(ctx: _Ctx, *, gated: bool) -> str:
    head = (f"{ctx.repo_id!r} is gated: accept its license on the model page (logged in), then authenticate here."
            if gated else f"{ctx.endpoint} refused access to {ctx.repo_id!r} (HTTP 401/403).")
    return (
        f"{head} Run `hf auth login` (or `huggingface-cli login`) with a read token from "
        "https://huggingface.co/settings/tokens, or pass token=... (or set HF_TOKEN); " + _token_note(ctx)
    )


def _no_network_message(ctx: _Ctx, reason: str) -> str:
    name = ctx.repo_id.rsplit("/", 1)[-1]
    return (
        f"Cannot reach {ctx.endpoint or 'the ' + ctx.source + ' hub'} to download {ctx.repo_id!r} ({reason}), "
        "and it is not in the local cache. If huggingface.co is blocked on your network, use a mirror: "
        f"export HF_ENDPOINT={HF_MIRROR} (or pass endpoint=...), or source='modelscope' / 'openmind'. "
        "With no network at all: download on a machine that has it, copy the folder here (e.g. to "
        f"~/models/{name}) and pass that path; offline=True (HF_HUB_OFFLINE=1) uses only what is cached."
    )


def _not_cached_message(ctx: _Ctx, reason: str) -> str:
    name = ctx.repo_id.rsplit("/", 1)[-1]
    revision = f" (revision {ctx.revision!r})" if ctx.revision else ""
    return (
        f"{ctx.repo_id!r}{revision} is not cached in {ctx.target} and {reason}, so it cannot be loaded here. "
        "To get it: (1) on a machine with network run npukit.hub.download("
        f"{ctx.repo_id!r}, local_dir='~/models/{name}') (in mainland China with HF_ENDPOINT={HF_MIRROR}); "
        f"(2) copy that folder here; (3) pass its path, e.g. npukit.load_model('~/models/{name}'). "
        "Or turn offline mode off (offline=False, unset HF_HUB_OFFLINE) if this machine has network."
    )


def _not_writable_message(ctx: _Ctx, path: Path | None) -> str:
    name = ctx.repo_id.rsplit("/", 1)[-1]
    return (
        f"Cannot write to {path} (needed to save {ctx.repo_id!r}; you are not allowed to write there). "
        f"Download into a folder you own under your home directory ($HOME = {Path.home()}) instead, e.g. "
        f"local_dir='~/models/{name}' (`mkdir -p ~/models`), or set HF_HOME=~/.cache/huggingface for the cache. "
        "On ModelArts / GitCode notebooks, system folders such as /home or /opt are read-only for your user."
    )
