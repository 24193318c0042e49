"""Tests for scripts/apply_patches.sh on a throw-away superproject with a local submodule.

Needs only git (no network, no real host submodules): an "upstream" repo and a superproject are
built under tmp_path; the upstream is added as a submodule through a file:// URL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "apply_patches.sh"
HOST = "FakeHost"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _env(home: Path) -> dict:
    env = dict(os.environ)
    # Isolate from the user's/global git config; allow file:// submodules (git >= 2.38.1
    # refuses them by default) via environment config so that `git submodule update` inside
    # the script works too.
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0="protocol.file.allow",
        GIT_CONFIG_VALUE_0="always",
        GIT_AUTHOR_NAME="Test Author",
        GIT_AUTHOR_EMAIL="author@example.com",
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
    )
    # Deliberately no committer identity: the script must supply one.
    for k in ("GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    return env


class Sandbox:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()
        (self.home / "gitconfig").write_text("")
        self.env = _env(self.home)
        self.upstream = tmp_path / "upstream"
        self.super = tmp_path / "super"
        self.work = tmp_path / "work"  # clone of upstream used to author patches

    def git(self, *args, cwd: Path, check=True, ident=True) -> subprocess.CompletedProcess:
        pre = ["-c", "user.name=Test", "-c", "user.email=test@example.com"] if ident else []
        return subprocess.run(
            ["git", *pre, *args], cwd=cwd, env=self.env, check=check, text=True, capture_output=True
        )

    def out(self, *args, cwd: Path) -> str:
        return self.git(*args, cwd=cwd).stdout.strip()

    @property
    def sub(self) -> Path:
        return self.super / HOST

    @property
    def patch_dir(self) -> Path:
        return self.super / "patches" / HOST

    def run_script(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(self.super / "scripts" / "apply_patches.sh"), *args],
            cwd=self.tmp,  # deliberately not the repo root
            env=self.env,
            text=True,
            capture_output=True,
        )


def _commit_file(sb: Sandbox, repo: Path, name: str, text: str, msg: str) -> None:
    (repo / name).write_text(text)
    sb.git("add", name, cwd=repo)
    sb.git("commit", "-q", "-m", msg, cwd=repo)


@pytest.fixture
def sb(tmp_path: Path) -> Sandbox:
    sb = Sandbox(tmp_path)
    # Upstream: 2 commits; the pin is the second one. A third commit after the pin exists so
    # that "pin" != upstream tip.
    sb.upstream.mkdir()
    sb.git("init", "-q", "-b", "main", cwd=sb.upstream)
    _commit_file(sb, sb.upstream, "model.py", "".join(f"line {i}\n" for i in range(20)), "initial")
    _commit_file(sb, sb.upstream, "README", "upstream readme\n", "readme")
    sb.pin = sb.out("rev-parse", "HEAD", cwd=sb.upstream)
    _commit_file(sb, sb.upstream, "later.txt", "after the pin\n", "later upstream work")

    # Superproject with the upstream as submodule, pinned to sb.pin.
    sb.super.mkdir()
    sb.git("init", "-q", "-b", "main", cwd=sb.super)
    sb.git("submodule", "add", "-q", sb.upstream.as_uri(), HOST, cwd=sb.super)
    sb.git("checkout", "-q", "--detach", sb.pin, cwd=sb.sub)
    (sb.super / "scripts").mkdir()
    shutil.copy2(SCRIPT, sb.super / "scripts" / "apply_patches.sh")
    sb.patch_dir.mkdir(parents=True)
    sb.git("add", "-A", cwd=sb.super)
    sb.git("commit", "-q", "-m", "superproject", cwd=sb.super)
    assert sb.out("ls-tree", "HEAD", HOST, cwd=sb.super).split()[2] == sb.pin
    return sb


def _make_series(sb: Sandbox, n: int = 2) -> list[Path]:
    """Author n commits on top of the pin in a separate clone and format-patch them."""
    sb.git("clone", "-q", sb.upstream.as_uri(), str(sb.work), cwd=sb.tmp)
    sb.git("checkout", "-q", "--detach", sb.pin, cwd=sb.work)
    lines = (sb.work / "model.py").read_text().splitlines(keepends=True)
    lines[3] = "line 3  # patched: hook\n"
    (sb.work / "model.py").write_text("".join(lines))
    sb.git("commit", "-q", "-am", "hook: call shared at line 3", cwd=sb.work)
    for i in range(1, n):
        _commit_file(sb, sb.work, f"new_{i}.py", f"# new file {i}\n", f"add new_{i}.py")
    sb.git("format-patch", "-q", "-o", str(sb.patch_dir), f"{sb.pin}..HEAD", cwd=sb.work)
    patches = sorted(sb.patch_dir.glob("*.patch"))
    assert len(patches) == n
    return patches


def _state(sb: Sandbox) -> tuple[str, str]:
    return (
        sb.out("rev-parse", "HEAD", cwd=sb.sub),
        sb.out("status", "--porcelain", "--untracked-files=all", cwd=sb.sub),
    )


def _am_in_progress(sb: Sandbox) -> bool:
    path = sb.out("rev-parse", "--git-path", "rebase-apply", cwd=sb.sub)
    return (sb.sub / path).exists() if not os.path.isabs(path) else Path(path).exists()


def test_no_patches_yet(sb: Sandbox):
    r = sb.run_script(HOST)
    assert r.returncode == 0, r.stderr
    assert f"no patches for {HOST} yet" in r.stdout
    assert _state(sb) == (sb.pin, "")


def test_applies_cleanly_pin_plus_n(sb: Sandbox):
    patches = _make_series(sb, n=3)
    r = sb.run_script(HOST)
    assert r.returncode == 0, r.stdout + r.stderr
    head, status = _state(sb)
    assert status == ""
    assert sb.out("rev-list", "--count", f"{sb.pin}..HEAD", cwd=sb.sub) == str(len(patches))
    assert sb.git("merge-base", "--is-ancestor", sb.pin, "HEAD", cwd=sb.sub).returncode == 0
    assert "# patched: hook" in (sb.sub / "model.py").read_text()
    assert (sb.sub / "new_2.py").exists()
    # Authors come from the patches, committer from the script's fallback identity.
    assert sb.out("log", "-1", "--format=%an", cwd=sb.sub) == "Test Author"
    assert sb.out("log", "-1", "--format=%cn", cwd=sb.sub) == "apply_patches"


def test_second_run_refuses_already_patched(sb: Sandbox):
    _make_series(sb, n=2)
    assert sb.run_script(HOST).returncode == 0
    before = _state(sb)
    r = sb.run_script(HOST)
    assert r.returncode == 3
    assert "already patched" in r.stderr
    assert "hook: call shared at line 3" in r.stderr  # lists the commits on top
    assert f"git -C {HOST} checkout {sb.pin}" in r.stderr  # says how to reset
    assert _state(sb) == before


def test_dirty_tree_refused(sb: Sandbox):
    _make_series(sb, n=1)
    (sb.sub / "README").write_text("local edit\n")
    r = sb.run_script(HOST)
    assert r.returncode != 0
    assert "dirty" in r.stderr
    assert sb.out("rev-parse", "HEAD", cwd=sb.sub) == sb.pin
    assert (sb.sub / "README").read_text() == "local edit\n"


def test_untracked_file_counts_as_dirty(sb: Sandbox):
    _make_series(sb, n=1)
    (sb.sub / "scratch.txt").write_text("x\n")
    r = sb.run_script(HOST)
    assert r.returncode != 0 and "dirty" in r.stderr
    assert sb.out("rev-parse", "HEAD", cwd=sb.sub) == sb.pin


def test_check_leaves_submodule_untouched(sb: Sandbox):
    _make_series(sb, n=2)
    before = _state(sb)
    branches_before = sb.out("branch", "-a", cwd=sb.sub)
    r = sb.run_script("--check", HOST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check OK" in r.stdout
    assert _state(sb) == before
    assert sb.out("branch", "-a", cwd=sb.sub) == branches_before
    assert sb.out("worktree", "list", "--porcelain", cwd=sb.sub).count("worktree ") == 1
    assert not _am_in_progress(sb)
    # ...and the real run still works afterwards.
    assert sb.run_script(HOST).returncode == 0


def test_check_reports_conflict_without_touching(sb: Sandbox):
    _make_series(sb, n=1)
    # Rewrite the patch so its context no longer matches the pin.
    p = next(sb.patch_dir.glob("*.patch"))
    p.write_text(p.read_text().replace(" line 2\n", " line 2 CHANGED\n"))
    before = _state(sb)
    r = sb.run_script("--check", HOST)
    assert r.returncode == 1
    assert "does NOT apply" in r.stderr
    assert _state(sb) == before
    assert not _am_in_progress(sb)


def test_conflicting_patch_fails_and_aborts(sb: Sandbox):
    # A patch authored against a different version of model.py: both the context and the
    # 3-way fallback conflict with the pin.
    sb.git("clone", "-q", sb.upstream.as_uri(), str(sb.work), cwd=sb.tmp)
    sb.git("checkout", "-q", "--detach", sb.pin, cwd=sb.work)
    (sb.work / "model.py").write_text("".join(f"other {i}\n" for i in range(20)))
    sb.git("commit", "-q", "-am", "diverge", cwd=sb.work)
    text = (sb.work / "model.py").read_text().replace("other 3\n", "other 3 patched\n")
    (sb.work / "model.py").write_text(text)
    sb.git("commit", "-q", "-am", "conflicting change", cwd=sb.work)
    sb.git("format-patch", "-q", "-1", "-o", str(sb.patch_dir), "HEAD", cwd=sb.work)

    r = sb.run_script(HOST)
    assert r.returncode == 1
    assert "git am failed" in r.stderr
    assert not _am_in_progress(sb)
    assert _state(sb) == (sb.pin, "")


def test_partial_series_failure_rolls_back(sb: Sandbox):
    # First patch fine, second conflicts: git am --abort must return to the pin, not pin+1.
    _make_series(sb, n=1)
    (sb.patch_dir / "0002-bad.patch").write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: X <x@example.com>\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
        "Subject: [PATCH] bad\n\n---\n"
        " README | 2 +-\n"
        "diff --git a/README b/README\n"
        "--- a/README\n+++ b/README\n"
        "@@ -1 +1 @@\n-something else entirely\n+x\n"
    )
    r = sb.run_script(HOST)
    assert r.returncode == 1
    assert not _am_in_progress(sb)
    assert _state(sb) == (sb.pin, "")


def test_initialises_submodule_in_fresh_clone(sb: Sandbox):
    _make_series(sb, n=2)
    sb.git("add", "patches", cwd=sb.super)
    sb.git("commit", "-q", "-m", "series", cwd=sb.super)
    clone = sb.tmp / "clone"
    sb.git("clone", "-q", sb.super.as_uri(), str(clone), cwd=sb.tmp)
    assert not (clone / HOST / ".git").exists()
    r = subprocess.run(
        ["bash", str(clone / "scripts" / "apply_patches.sh"), HOST],
        cwd=sb.tmp, env=sb.env, text=True, capture_output=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sb.out("rev-list", "--count", f"{sb.pin}..HEAD", cwd=clone / HOST) == "2"


# ------------------------------------------------------------------------------------------------
# offline initialisation from a local mirror (--mirror)

UNREACHABLE = "https://127.0.0.1:9/FakeHost.git"  # the discard port: connection refused at once


def _user_env(sb: Sandbox) -> dict:
    """The sandbox env without the global protocol.file.allow=always the other tests use: a user's
    default git (file:// and local paths refused for submodule clones since git 2.38.1), no proxy."""
    env = dict(sb.env)
    for k in ("GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0",
              "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


def _git_at_least(*version: int) -> bool:
    out = subprocess.run(["git", "--version"], text=True, capture_output=True, check=True).stdout
    nums = [int(x) for x in out.split()[2].split(".")[:3] if x.isdigit()]
    return tuple(nums) >= version


@pytest.fixture
def offline(sb: Sandbox):
    """A fresh clone of the superproject whose .gitmodules URL cannot be reached (no network), the
    series committed, and a bare mirror of the upstream at <tmp>/mirrors/FakeHost.git."""
    _make_series(sb, n=2)
    sb.git("config", "-f", ".gitmodules", f"submodule.{HOST}.url", UNREACHABLE, cwd=sb.super)
    sb.git("add", "-A", cwd=sb.super)
    sb.git("commit", "-q", "-m", "series; upstream URL unreachable", cwd=sb.super)
    clone = sb.tmp / "clone"
    sb.git("clone", "-q", sb.super.as_uri(), str(clone), cwd=sb.tmp)
    mirrors = sb.tmp / "mirrors"
    mirrors.mkdir()
    sb.git("clone", "-q", "--mirror", str(sb.upstream), str(mirrors / f"{HOST}.git"), cwd=sb.tmp)
    assert not (clone / HOST / ".git").exists()
    return clone, mirrors, _user_env(sb)


def _run_in(clone: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(clone / "scripts" / "apply_patches.sh"), *args],
                          cwd=clone.parent, env=env, text=True, capture_output=True)


def test_offline_mirror_initialises_and_applies(sb: Sandbox, offline):
    clone, mirrors, env = offline
    r = _run_in(clone, env, "--mirror", str(mirrors), HOST)
    assert r.returncode == 0, r.stdout + r.stderr
    mirror = str((mirrors / f"{HOST}.git").resolve())
    sub = clone / HOST
    assert sb.out("rev-list", "--count", f"{sb.pin}..HEAD", cwd=sub) == "2"
    assert sb.git("merge-base", "--is-ancestor", sb.pin, "HEAD", cwd=sub).returncode == 0
    assert sb.out("remote", "get-url", "origin", cwd=sub) == mirror
    assert sb.out("config", f"submodule.{HOST}.url", cwd=clone) == mirror
    assert f"submodule.{HOST}.url = {mirror}" in r.stdout
    # nothing global was needed: the user's config is still empty
    assert (sb.home / "gitconfig").read_text() == ""


def test_offline_without_mirror_prints_advice_that_works(sb: Sandbox, offline):
    clone, mirrors, env = offline
    r = _run_in(clone, env, HOST)
    assert r.returncode == 1
    assert "--mirror" in r.stderr
    hand = f"git -c protocol.file.allow=always submodule update --init -- {HOST}"
    assert hand in r.stderr and f"git config submodule.{HOST}.url" in r.stderr
    assert "git config protocol.file.allow always" not in r.stderr  # the old advice (does not work)

    def git(*args):
        return subprocess.run(["git", *args], cwd=clone, env=env, text=True, capture_output=True)

    mirror = str(mirrors / f"{HOST}.git")
    assert git("config", f"submodule.{HOST}.url", mirror).returncode == 0
    if _git_at_least(2, 38, 1):
        # why the old advice failed: a repo-local setting does not reach the submodule clone
        assert git("config", "protocol.file.allow", "always").returncode == 0
        old = git("submodule", "update", "--init", "--", HOST)
        assert old.returncode != 0 and "transport 'file' not allowed" in old.stderr
        assert git("config", "--unset", "protocol.file.allow").returncode == 0
        shutil.rmtree(clone / ".git" / "modules", ignore_errors=True)
    new = git(*hand.split()[1:])
    assert new.returncode == 0, new.stderr
    r = _run_in(clone, env, HOST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sb.out("rev-list", "--count", f"{sb.pin}..HEAD", cwd=clone / HOST) == "2"


def test_mirror_errors_and_checked_out_submodule(sb: Sandbox, offline):
    clone, mirrors, env = offline
    empty = sb.tmp / "empty"
    empty.mkdir()
    r = _run_in(clone, env, "--mirror", str(empty), HOST)
    assert r.returncode == 1
    assert f"{empty.resolve()}/{HOST}.git or {empty.resolve()}/{HOST}" in r.stderr
    assert not (clone / HOST / ".git").exists()
    # a folder inside another work tree is not taken for a repository
    (empty / HOST).mkdir()
    sb.git("init", "-q", str(empty), cwd=sb.tmp)
    assert _run_in(clone, env, "--mirror", str(empty), HOST).returncode == 1
    r = _run_in(clone, env, "--mirror", str(sb.tmp / "missing"), HOST)
    assert r.returncode == 2 and "--mirror: expected an existing directory" in r.stderr
    r = _run_in(clone, env, HOST, "--mirror")
    assert r.returncode == 2 and "usage" in r.stderr
    # already checked out: the mirror is not needed and the URL is left alone
    r = sb.run_script("--mirror", str(mirrors), HOST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--mirror not used" in r.stdout
    assert sb.out("config", f"submodule.{HOST}.url", cwd=sb.super) == sb.upstream.as_uri()


def test_unknown_host_and_usage(sb: Sandbox):
    r = sb.run_script("NoSuchHost")
    assert r.returncode == 1
    assert "not recorded" in r.stderr
    r = sb.run_script()
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_bash_syntax():
    for script in (SCRIPT, REPO_ROOT / "eval" / "setup_env.sh", REPO_ROOT / "eval" / "LISA" / "eval.sh"):
        if script.exists():
            subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("host", ["LLaVA-NeXT", "LLaVA-3D", "Chat-Scene", "LISA"])
def test_setup_env_print_mode(host):
    """`eval/setup_env.sh --print` only prints; it must run here (no GPU, no network)."""
    script = REPO_ROOT / "eval" / "setup_env.sh"
    if not script.exists():
        pytest.skip("eval/setup_env.sh not present")
    env = dict(os.environ, ENV_KIND="venv")
    r = subprocess.run(["bash", str(script), "--print", host], env=env, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert f"scripts/apply_patches.sh {host}" in r.stdout
    assert f"-r {REPO_ROOT}/eval/{host}/requirements.txt" in r.stdout
    assert "download.pytorch.org/whl/cu1" in r.stdout


# ------------------------------------------------------------------------------------------------
# eval/LISA/eval.sh --help: no GPU, no LISA checkout


@pytest.fixture
def lisa_eval_copy(tmp_path: Path):
    """eval/LISA/{eval.sh,eval_seg.py} in a throw-away repo root with `shared` linked and no LISA/,
    and a PATH whose `nvidia-smi` lists no GPU (so the result does not depend on this machine)."""
    pytest.importorskip("torch")  # eval_seg.py imports torch at module level
    root = tmp_path / "repo"
    (root / "eval" / "LISA").mkdir(parents=True)
    for name in ("eval.sh", "eval_seg.py"):
        shutil.copy2(REPO_ROOT / "eval" / "LISA" / name, root / "eval" / "LISA" / name)
    (root / "shared").symlink_to(REPO_ROOT / "shared", target_is_directory=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")  # `nvidia-smi -L` prints no GPU
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("NGPUS", None)
    assert not (root / "LISA").exists()
    return root, env


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_lisa_eval_help_needs_no_gpu(lisa_eval_copy, flag):
    root, env = lisa_eval_copy
    r = subprocess.run(["bash", str(root / "eval" / "LISA" / "eval.sh"), "--out", "x", flag],
                       cwd=root, env=env, text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no GPU found" not in r.stderr
    # eval.sh's own usage (its header) ...
    assert "Usage:\n  eval/LISA/eval.sh --version <LISA ckpt> --dataset-dir <dataset> --out <run dir>" in r.stdout
    assert "NGPUS" in r.stdout and not any(line.startswith("#") for line in r.stdout.splitlines())
    # ... then the driver's argparse help
    assert "usage: eval_seg.py" in r.stdout
    for opt in ("--version VERSION", "--dataset-dir DATASET_DIR", "--method-args", "--preset", "--out OUT"):
        assert opt in r.stdout


def test_lisa_eval_without_gpu_still_refuses_a_run(lisa_eval_copy):
    root, env = lisa_eval_copy
    r = subprocess.run(["bash", str(root / "eval" / "LISA" / "eval.sh"), "--out", "x"],
                       cwd=root, env=env, text=True, capture_output=True, timeout=60)
    assert r.returncode == 1
    assert "eval.sh: no GPU found" in r.stderr and "usage: eval_seg.py" not in r.stdout
