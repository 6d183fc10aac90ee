"""Can a Hub dataset be read from here? Asked before training, answered in one line.

A ``[data] datasets`` entry like ``"HuggingFaceFW/fineweb-edu"`` is read from
the Hugging Face Hub. Without a network the ``datasets`` library retries
HTTP for tens of seconds and ends in a long traceback; :func:`hub_problem`
finds that out first: it is fine when the dataset is in the local Hub cache,
or when the Hub endpoint accepts a TCP connection (3 s), and otherwise says
what to do offline.
"""

from __future__ import annotations

import glob
import os
import socket
from urllib.parse import urlparse


def hub_cache_dir() -> str:
    """The Hub cache folder the ``huggingface_hub`` library uses (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def cached(repo_id: str) -> bool:
    """Whether a snapshot of the dataset ``repo_id`` is in the local Hub cache."""
    folder = os.path.join(hub_cache_dir(), "datasets--" + repo_id.replace("/", "--"), "snapshots")
    return any(os.listdir(s) for s in glob.glob(os.path.join(folder, "*")) if os.path.isdir(s))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT, default huggingface.co) accepts a TCP connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_problem(name: str, repo_id: str) -> str | None:
    """One line when the Hub dataset ``repo_id`` (source ``name``) cannot be read from here, else None."""
    if cached(repo_id):
        return None
    if offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local Hub cache"
    elif not reachable():
        why = "the Hub cannot be reached and it is not in the local Hub cache"
    else:
        return None
    return (f"[data] source {name!r} is the Hub dataset {repo_id!r} but {why} ({hub_cache_dir()}); "
            f"offline: download it where there is a network (huggingface-cli download --repo-type dataset "
            f"{repo_id}), copy the cache here and set HF_HUB_OFFLINE=1, or give [data] datasets a local copy "
            "(a folder of parquet/jsonl files)")
