"""Checkpoints that a kill cannot corrupt unnoticed.

The Trainer writes `checkpoint-<step>/` file by file. `SfrnnTrainer` then writes `manifest.json` (every file's size
and SHA-256) last and atomically: a checkpoint is *intact* when its manifest exists and every file still matches it.
A resume takes the newest intact checkpoint and names each newer one it skipped, with the reason.
"""

import hashlib
import json
import os
import re

MANIFEST = "manifest.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_atomically(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a reader never sees half a file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under `folder` but the manifest, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def write_manifest(folder: str) -> None:
    """Seal a fully written checkpoint: `manifest.json` lists each file's size and SHA-256."""
    files = {}
    for relative in _files(folder):
        path = os.path.join(folder, relative)
        files[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    write_atomically(os.path.join(folder, MANIFEST), json.dumps({"files": files}, indent=1))


def damage(folder: str) -> str | None:
    """Why `folder` is not an intact checkpoint (naming the file), or None when it is."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST} (the checkpoint was not completely written)"
    try:
        with open(manifest_path) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is unreadable ({error})"
    for relative, expected in files.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != expected["bytes"]:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def checkpoints(output_dir: str) -> list[str]:
    """`output_dir/checkpoint-<step>` folders, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), name) for name in os.listdir(output_dir)
             if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def newest_intact(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest intact checkpoint in `output_dir` (None if there is none) and the newer ones skipped, each with
    the reason."""
    skipped = []
    for folder in checkpoints(output_dir):
        reason = damage(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped
