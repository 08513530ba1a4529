"""Where a checkpoint is: a local directory, or a hub id resolved into the Hugging Face cache (huggingface_hub,
imported where it is used so that `import blip2` does not pay for it)."""

import os

from .errors import CheckpointError, CheckpointNotFoundError
from .safetensors import INDEX, SINGLE, ST_DTYPES, TensorInfo

MODEL_FILES = ["config.json", "generation_config.json", SINGLE, INDEX, "model-*-of-*.safetensors"]
PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model"]


def is_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """cache_dir, else HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def download_hint(repo_id: str) -> str:
    return f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`)"


def looks_local(path: str) -> bool:
    """A path rather than a hub id (org/name)."""
    return path.startswith((".", "/", "~", os.sep)) or path.count("/") > 1 or "\\" in path


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                       local_files_only: bool | None = None, allow_patterns: list[str] | None = None) -> str:
    """A local checkpoint directory for `path_or_id`: the directory itself, or the Hugging Face cache snapshot of
    a hub id (downloaded if needed; only `allow_patterns`, by default the model and processor files).
    Honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE=1 and HF_TOKEN. Raises CheckpointError subclasses that name
    the id, the cause and the fix."""
    path = os.path.expanduser(os.fspath(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint directory (config.json and "
                                      f"*.safetensors) or a hub id")
    if looks_local(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path} not found")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline() if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir(cache_dir)
    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache, token=token, local_files_only=offline,
                                 allow_patterns=allow_patterns or MODEL_FILES + PROCESSOR_FILES)
    except HFValidationError:
        msg = f"{path!r} is neither a local directory nor a valid Hugging Face hub id (org/name)"
    except GatedRepoError:
        raise CheckpointNotFoundError(
            f"{path} is a gated repository on the Hugging Face Hub and this request has no access. Fix: accept its "
            f"terms at https://huggingface.co/{path}, then pass token=... or set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        msg = (f"{path}: no such repository on the Hugging Face Hub, or it is private (then pass token=... or set "
               f"HF_TOKEN), and no local directory of that name exists")
    except RevisionNotFoundError:
        msg = f"{path} has no revision {revision!r} on the Hugging Face Hub (use a branch, tag or commit hash)"
    except LocalEntryNotFoundError:
        if offline:
            why = "HF_HUB_OFFLINE=1" if local_files_only is None else "local_files_only=True"
            msg = (f"{path}{at} is not in the Hugging Face cache ({cache}) and downloads are off ({why}). "
                   f"Fix: download it once while online with {download_hint(path)}, point HF_HUB_CACHE / "
                   f"cache_dir at the cache that holds it, or pass a local checkpoint directory")
        else:
            msg = (f"{path}{at} could not be fetched from the Hugging Face Hub (no connection?) and is not in the "
                   f"cache ({cache}). Fix: check the network and retry, download it with {download_hint(path)}, "
                   f"or pass a local checkpoint directory")
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}{at}: download from the Hugging Face Hub failed ({first}). Fix: retry, or "
                              f"download it with {download_hint(path)}") from None
    raise CheckpointNotFoundError(msg)


def local_or_remote(path_or_id: str | os.PathLike, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                    local_files_only: bool | None = None) -> tuple[str, dict[str, TensorInfo] | None]:
    """(local dir, None) when the checkpoint is here or cached; else (the cached config.json's dir, the remote
    safetensors headers read with huggingface_hub.get_safetensors_metadata: no weights are downloaded)."""
    offline = is_offline() if local_files_only is None else local_files_only
    try:
        path = resolve_checkpoint(path_or_id, revision, cache_dir, token, True, MODEL_FILES)
        if offline or any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE, INDEX)):
            return path, None  # (a cached snapshot may hold only the config.json of an earlier report)
    except CheckpointNotFoundError:
        if offline or looks_local(os.fspath(path_or_id)):
            raise
    import huggingface_hub

    repo = os.fspath(path_or_id)
    cfg = huggingface_hub.hf_hub_download(repo, "config.json", revision=revision, cache_dir=hub_cache_dir(cache_dir),
                                          token=token)
    meta = huggingface_hub.get_safetensors_metadata(repo, revision=revision, token=token)
    tensors = {}
    for fname, fm in meta.files_metadata.items():
        for key, t in fm.tensors.items():
            tensors[key] = TensorInfo(f"{repo}/{fname}", key, ST_DTYPES[t.dtype], tuple(t.shape), *t.data_offsets)
    return os.path.dirname(cfg), tensors
