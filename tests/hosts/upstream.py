"""Upstream host sources for tests: locate them, materialise a patched copy, import it.

The project never holds a host's files (submodules are gitlinks; ``patches/<Host>`` are ``git am``
series). A test that runs the real patched host code gets a patched tree from:

1. the checked-out submodule ``<repo>/<Host>`` (a git checkout with files that has the pinned
   commit): cloned into a temporary directory, the pin checked out, the series applied (a sparse
   submodule lends its patterns to the copy, see ``sparse_patterns``);
2. else the text-only snapshot ``../shared/upstream/<Host>-<pin[:12]>.tar.gz`` (relative to the
   repo root; see its README): unpacked into a temporary directory, committed to a fresh
   repository there, the series applied. Its commit id is not the pin; ``Source.kind`` says which;
3. else ``Unavailable`` (tests skip with its message, which names both places looked at).

The pin is the gitlink the superproject records (``git ls-files --stage <Host>``, as
``scripts/apply_patches.sh`` reads it); ``KNOWN_PINS`` is the fallback when the repo is not a git
checkout. A series that does not apply raises ``RuntimeError`` (a test failure, never a skip).
Trees are materialised once per process (per pytest session) and cached; nothing is written
inside the repository.

    tree = patched_tree("LISA")            # Path of the patched work tree
    use_tree(tree, ("model", "utils"))     # sys.path + a check that those names are not taken
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT.parent / "shared" / "upstream"

#: Top-level import names each host tree provides (``use_tree`` refuses to shadow other copies).
PACKAGES: Dict[str, Tuple[str, ...]] = {
    "LISA": ("model", "utils"),
    "LLaVA-NeXT": ("llava",),
    "LLaVA-3D": ("llava",),
    "Chat-Scene": ("models", "utils", "dataset", "tasks"),
}

#: Pins as documented (scripts/apply_patches.sh); used only when the superproject index is unreadable.
KNOWN_PINS: Dict[str, str] = {
    "LLaVA-NeXT": "e9835311c6f515a13702eb7a7750fcd936f65ed8",
    "LLaVA-3D": "91d979dca9998174c8eda50744de8da448e0ba0c",
    "Chat-Scene": "475e10698b405065bb2a56b70f74ae979c3207ee",
    "LISA": "3cb2d4301f1af4691bd4f3938335ef06e76f155a",
}

_IDENT = ["-c", "user.name=upstream-test", "-c", "user.email=upstream-test@localhost", "-c", "commit.gpgsign=false"]
_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}


class Unavailable(Exception):
    """No source for a host here (no submodule checkout, no snapshot, or no git): tests skip."""


@dataclass(frozen=True)
class Source:
    """Where a host's pinned code comes from. kind: "submodule" | "snapshot"; path: the submodule
    directory or the archive; pin: the gitlink commit."""

    host: str
    kind: str
    path: Path
    pin: str


@dataclass(frozen=True)
class PatchedTree:
    """A materialised patched host: ``path`` (work tree), its ``source``, the ``base`` commit the
    series was applied on (the pin for a submodule, a fresh commit for a snapshot) and ``patches``."""

    path: Path
    source: Source
    base: str
    patches: Tuple[Path, ...]

    def stock_file(self, rel: str) -> str:
        """Text of ``rel`` before the series (at ``base``)."""
        return _git(self.path, "show", f"{self.base}:{rel}").stdout


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **_GIT_ENV}
    return subprocess.run(["git", *_IDENT, *args], cwd=str(cwd), env=env, text=True, capture_output=True, check=check)


#: Set to 1 by scripts/test.sh in the environment built for a host's tests: a missing package or a
#: wrong transformers version there fails the tests instead of skipping them.
REQUIRED_ENV = "HOST_TESTS_REQUIRED"


def unavailable(reason: str) -> None:
    """The environment cannot run the calling test: skip with ``reason`` (fail if ``$HOST_TESTS_REQUIRED`` is 1)."""
    import pytest

    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{reason} (${REQUIRED_ENV}=1: this environment is meant to run the host tests)")
    pytest.skip(reason)


def tree_or_skip(host: str) -> "PatchedTree":
    """``patched_tree(host)``, skipping the calling test when no source is there (always a skip:
    the snapshot folder may be absent); a series that fails to apply raises (a failure)."""
    import pytest

    try:
        return patched_tree(host)
    except Unavailable as e:
        pytest.skip(str(e))


def pin_of(host: str, root: Path = ROOT) -> str:
    """The gitlink the superproject index records for ``host`` (else ``KNOWN_PINS[host]``)."""
    if shutil.which("git") is not None:
        r = subprocess.run(["git", "-C", str(root), "ls-files", "--stage", "--", host], text=True, capture_output=True)
        fields = r.stdout.split()
        if r.returncode == 0 and len(fields) >= 2 and fields[0] == "160000":
            return fields[1]
    if host in KNOWN_PINS:
        return KNOWN_PINS[host]
    raise Unavailable(f"host: {host!r} is not a submodule of {root} and has no known pin")


def locate(host: str, root: Path = ROOT, snapshots: Path = SNAPSHOTS) -> Source:
    """The source of ``host``'s pinned code: the submodule checkout, else the snapshot archive."""
    if shutil.which("git") is None:
        raise Unavailable(f"{host}: git is not installed (needed to apply patches/{host} with git am)")
    pin = pin_of(host, root)
    notes = []
    sub = root / host
    if sub.is_dir() and any(sub.iterdir()):
        has_pin = (sub / ".git").exists() and _git(sub, "cat-file", "-e", f"{pin}^{{commit}}", check=False).returncode == 0
        if has_pin:
            return Source(host, "submodule", sub, pin)
        notes.append(f"the submodule {sub} has files but not the pinned commit {pin[:12]}")
    else:
        notes.append(f"the submodule {sub} is not checked out (git submodule update --init {host})")
    archive = snapshots / f"{host}-{pin[:12]}.tar.gz"
    if archive.is_file():
        return Source(host, "snapshot", archive, pin)
    notes.append(f"no snapshot {archive}")
    raise Unavailable(f"{host} source unavailable: " + "; ".join(notes))


def _unpack(archive: Path, host: str, dest: Path) -> Path:
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        if not names or any(n != host and not n.startswith(host + "/") for n in names):
            raise RuntimeError(f"archive: expected every member of {archive} under {host}/, got e.g. {names[:3]}")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python < 3.11.4: members were checked to stay under host/ above
            tf.extractall(dest)
    return dest / host


def materialise(source: Source, dest: Path, patches_dir: Optional[Path] = None) -> PatchedTree:
    """Create ``dest`` (must not exist) holding ``source`` at its pin with ``patches/<Host>`` applied."""
    patches_dir = patches_dir if patches_dir is not None else ROOT / "patches" / source.host
    series = tuple(sorted(patches_dir.glob("*.patch"), key=lambda p: p.name))
    dest = Path(dest)
    if dest.exists():
        raise ValueError(f"dest: expected a path that does not exist yet, got {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sparse: Optional[Tuple[str, ...]] = None
    if source.kind == "submodule":
        _git(dest.parent, "clone", "--quiet", "--no-checkout", str(source.path), str(dest))
        sparse = sparse_patterns(source.path)
        if sparse:
            _git(dest, "sparse-checkout", "set", "--no-cone", *sparse)
        _git(dest, "checkout", "--quiet", "--detach", source.pin)
        base = source.pin
    elif source.kind == "snapshot":
        scratch = Path(tempfile.mkdtemp(prefix="unpack-", dir=dest.parent))
        shutil.move(str(_unpack(source.path, source.host, scratch)), str(dest))
        shutil.rmtree(scratch)
        _git(dest, "init", "--quiet")
        _git(dest, "add", "--all", "--force")
        _git(dest, "commit", "--quiet", "--no-verify", "-m", f"{source.host} snapshot of {source.pin}")
        base = _git(dest, "rev-parse", "HEAD").stdout.strip()
    else:
        raise ValueError(f"source.kind: expected 'submodule' or 'snapshot', got {source.kind!r}")
    if series and sparse:
        _apply_missing_ok(dest, series, source)
    elif series:
        r = _git(dest, "am", "--quiet", "--3way", "--committer-date-is-author-date", *map(str, series), check=False)
        if r.returncode != 0:
            _git(dest, "am", "--abort", check=False)
            raise RuntimeError(
                f"patches/{source.host}: the series does not apply on the {source.kind} {source.path} "
                f"(pin {source.pin[:12]}):\n{r.stdout}{r.stderr}"
            )
    return PatchedTree(dest, source, base, series)


def sparse_patterns(repo: Path) -> Optional[Tuple[str, ...]]:
    """The sparse-checkout patterns of a checkout, None when it is not sparse.

    A submodule may be a sparse checkout of a partial clone or mirror that lacks some blobs (LLaVA-3D's
    mirror here has no ``meteor-1.5.jar``: ``git sparse-checkout set --no-cone '/*' '!*.jar'``). The
    materialised copy reuses the patterns, so its checkout never needs those blobs."""
    if _git(repo, "config", "--bool", "core.sparseCheckout", check=False).stdout.strip() != "true":
        return None
    r = _git(repo, "sparse-checkout", "list", check=False)
    patterns = tuple(ln for ln in r.stdout.splitlines() if ln.strip())
    return patterns if r.returncode == 0 and patterns else None


def _apply_missing_ok(dest: Path, series: Sequence[Path], source: Source) -> None:
    """``git am`` for a sparse checkout whose repository lacks blobs outside the patterns: ``git am``
    writes its trees with ``git write-tree``, which refuses missing objects. Per patch: ``git mailinfo``,
    ``git apply --index``, ``git write-tree --missing-ok``, ``git commit-tree`` with the patch's author
    and date (committer date = author date, as ``--committer-date-is-author-date``)."""
    scratch = Path(tempfile.mkdtemp(prefix="mailinfo-", dir=dest.parent))
    try:
        for patch in series:
            msg, body = scratch / "msg", scratch / "patch"
            env = {**os.environ, **_GIT_ENV}
            info = subprocess.run(["git", "mailinfo", str(msg), str(body)], input=patch.read_text(), cwd=str(dest),
                                  env=env, text=True, capture_output=True, check=True).stdout
            fields = dict(ln.split(": ", 1) for ln in info.splitlines() if ": " in ln)
            r = _git(dest, "apply", "--index", str(body), check=False)
            if r.returncode != 0:
                raise RuntimeError(
                    f"patches/{source.host}: {patch.name} does not apply on the {source.kind} {source.path} "
                    f"(pin {source.pin[:12]}):\n{r.stdout}{r.stderr}"
                )
            tree = _git(dest, "write-tree", "--missing-ok").stdout.strip()
            text = fields.get("Subject", patch.stem) + ("\n\n" + msg.read_text() if msg.read_text().strip() else "\n")
            date = fields.get("Date", _GIT_ENV["GIT_AUTHOR_DATE"])
            cenv = {**env, "GIT_AUTHOR_NAME": fields.get("Author", ""), "GIT_AUTHOR_EMAIL": fields.get("Email", ""),
                    "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
            commit = subprocess.run(["git", *_IDENT, "commit-tree", tree, "-p", "HEAD", "-F", "-"], input=text,
                                    cwd=str(dest), env=cenv, text=True, capture_output=True, check=True).stdout.strip()
            _git(dest, "update-ref", "HEAD", commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_CACHE: Dict[str, PatchedTree] = {}
_WORKDIR: Optional[Path] = None


def _workdir() -> Path:
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="upstream-hosts-"))
        atexit.register(shutil.rmtree, str(_WORKDIR), True)
    return _WORKDIR


def patched_tree(host: str) -> PatchedTree:
    """The patched tree of ``host``, materialised once per process in a temporary directory.
    Raises ``Unavailable`` (skip) when there is no source, ``RuntimeError`` when the series fails."""
    if host not in _CACHE:
        _CACHE[host] = materialise(locate(host), _workdir() / host)
    return _CACHE[host]


def use_tree(tree: Path, packages: Sequence[str]) -> Path:
    """Put ``tree`` first on ``sys.path`` so its top-level ``packages`` import from it. Raises
    ``RuntimeError`` if one of them is already imported from elsewhere (another host's copy)."""
    tree = Path(tree).resolve()
    for name in packages:
        mod = sys.modules.get(name)
        where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if mod is not None and (where is None or tree not in Path(where).resolve().parents):
            raise RuntimeError(
                f"packages: {name!r} is already imported from {where}; run this host's tests in their own process"
            )
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    return tree


def env_with_tree(tree: Path, *paths: os.PathLike) -> Dict[str, str]:
    """Environment for a subprocess importing from ``tree``: PYTHONPATH = tree, ``paths``, repo
    root, then the current PYTHONPATH."""
    parts = [str(tree), *map(str, paths), str(ROOT)]
    old = os.environ.get("PYTHONPATH")
    if old:
        parts.append(old)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


__all__ = [
    "KNOWN_PINS",
    "PACKAGES",
    "PatchedTree",
    "ROOT",
    "SNAPSHOTS",
    "Source",
    "Unavailable",
    "env_with_tree",
    "locate",
    "materialise",
    "patched_tree",
    "pin_of",
    "sparse_patterns",
    "tree_or_skip",
    "unavailable",
    "use_tree",
]
