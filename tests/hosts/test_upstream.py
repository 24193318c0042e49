"""tests/hosts/upstream.py on a made-up host: where the source is found, how the series is applied."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pytest

from . import upstream

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")

ID = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def git(cwd, *args):
    return subprocess.run(["git", *ID, *args], cwd=str(cwd), check=True, text=True, capture_output=True).stdout.strip()


@pytest.fixture
def world(tmp_path):
    """An upstream repo 'Demo' (pin = its first commit, a second commit exported as the series), a
    superproject recording the pin as a gitlink, and an empty snapshots folder."""
    up = tmp_path / "upstream-Demo"
    up.mkdir()
    git(up, "init", "-q")
    (up / "mod.py").write_text("VALUE = 1\n")
    git(up, "add", "mod.py")
    git(up, "commit", "-qm", "base")
    pin = git(up, "rev-parse", "HEAD")
    (up / "mod.py").write_text("VALUE = 1\nPATCHED = True  # [Pruner]\n")
    git(up, "commit", "-qam", "Pruner: add a marker")
    patches = tmp_path / "patches" / "Demo"
    patches.mkdir(parents=True)
    git(up, "format-patch", "-q", "-1", "HEAD", "-o", str(patches))
    git(up, "reset", "-q", "--hard", pin)
    root = tmp_path / "super"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "update-index", "--add", "--cacheinfo", f"160000,{pin},Demo")
    (root / "Demo").mkdir()  # an uninitialised submodule is an empty folder
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    return dict(up=up, pin=pin, patches=patches, root=root, snaps=snaps, tmp=tmp_path)


def make_snapshot(w):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"VALUE = 1\n"
        info = tarfile.TarInfo("Demo/mod.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    path = w["snaps"] / f"Demo-{w['pin'][:12]}.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


def test_pin_is_the_gitlink(world):
    assert upstream.pin_of("Demo", world["root"]) == world["pin"]


def test_nothing_there_is_unavailable_naming_both_places(world):
    with pytest.raises(upstream.Unavailable, match=r"Demo source unavailable: the submodule .* is not checked out.*no snapshot"):
        upstream.locate("Demo", world["root"], world["snaps"])


def test_snapshot_is_committed_and_patched(world):
    snap = make_snapshot(world)
    src = upstream.locate("Demo", world["root"], world["snaps"])
    assert (src.kind, src.path, src.pin) == ("snapshot", snap, world["pin"])
    tree = upstream.materialise(src, world["tmp"] / "out", patches_dir=world["patches"])
    assert (tree.path / "mod.py").read_text() == "VALUE = 1\nPATCHED = True  # [Pruner]\n"
    assert tree.base != world["pin"]  # a fresh repository: the snapshot's commit is not the pin
    assert tree.stock_file("mod.py") == "VALUE = 1\n"
    assert git(tree.path, "rev-list", "--count", f"{tree.base}..HEAD") == "1"
    assert not (world["root"] / "Demo" / "mod.py").exists()  # nothing written into the superproject


def test_checked_out_submodule_wins_over_the_snapshot(world):
    make_snapshot(world)
    sub = world["root"] / "Demo"
    sub.rmdir()
    git(world["root"], "clone", "-q", str(world["up"]), "Demo")
    src = upstream.locate("Demo", world["root"], world["snaps"])
    assert (src.kind, src.path) == ("submodule", sub)
    tree = upstream.materialise(src, world["tmp"] / "out", patches_dir=world["patches"])
    assert tree.base == world["pin"] and "PATCHED" in (tree.path / "mod.py").read_text()
    assert git(sub, "rev-parse", "HEAD") == world["pin"] and "PATCHED" not in (sub / "mod.py").read_text()


def test_submodule_without_the_pin_falls_back_to_the_snapshot(world):
    snap = make_snapshot(world)
    sub = world["root"] / "Demo"
    (sub / "stray.txt").write_text("not a checkout\n")
    src = upstream.locate("Demo", world["root"], world["snaps"])
    assert (src.kind, src.path) == ("snapshot", snap)


def test_a_series_that_does_not_apply_is_an_error_not_a_skip(world):
    make_snapshot(world)
    bad = world["tmp"] / "bad"
    bad.mkdir()
    text = next(world["patches"].glob("*.patch")).read_text().replace(" VALUE = 1", " VALUE = 2")
    (bad / "0001-bad.patch").write_text(text)
    src = upstream.locate("Demo", world["root"], world["snaps"])
    with pytest.raises(RuntimeError, match="patches/Demo: the series does not apply"):
        upstream.materialise(src, world["tmp"] / "out", patches_dir=bad)


def test_use_tree_refuses_a_package_imported_from_elsewhere(tmp_path):
    with pytest.raises(RuntimeError, match="'pytest' is already imported from"):
        upstream.use_tree(tmp_path, ("pytest",))


def test_real_snapshots_match_the_gitlinks():
    """Each host with a snapshot in ../shared/upstream has it at the commit the superproject pins."""
    if not upstream.SNAPSHOTS.is_dir():
        pytest.skip(f"no snapshot folder {upstream.SNAPSHOTS}")
    for host in ("LISA", "LLaVA-NeXT", "Chat-Scene"):
        assert (upstream.SNAPSHOTS / f"{host}-{upstream.pin_of(host)[:12]}.tar.gz").is_file(), host
