"""shared.datasets: frame sampling, the synthetic room, canvas preparation, loaders, sampler CLI."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from shared.datasets import (
    SceneViews,
    episode_source,
    load_openeqa,
    load_openeqa_episode,
    load_scannet_scene,
    load_scanqa,
    make_room_scene,
    prepare_views,
    room_geometry,
    sample_frames,
    sample_indices,
    sort_frame_ids,
    write_scannet_layout,
)
from shared.datasets.synthetic_scene import look_at
from shared.geometry import backproject, resize_intrinsics, square_transform, transform_intrinsics

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "scenes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def room():
    return make_room_scene()  # 12 views, 288×384, seed 0


# ----------------------------------------------------------------------------- frame sampling

def test_released_rule_n100_k12_hand_computed():
    # round(8.25·i) with Python's half-to-even: 16.5 → 16, 49.5 → 50, 82.5 → 82
    assert sample_indices(100, 12, "released") == [0, 8, 16, 25, 33, 41, 50, 58, 66, 74, 82, 91]
    ids = [str(i) for i in range(100)]
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(ids))
    assert sample_frames(shuffled, 12) == ["0", "8", "16", "25", "33", "41", "50", "58", "66", "74", "82", "91"]


def test_numeric_order_and_linspace_and_short_scenes():
    assert sort_frame_ids(["1000", "200", "30", "000004"]) == ["000004", "30", "200", "1000"]
    assert sorted(["1000", "200"]) == ["1000", "200"]  # what the released eval's glob order gives
    assert sample_indices(100, 12, "linspace") == [round(i * 99 / 11) for i in range(12)]
    assert sample_indices(100, 12, "linspace")[-1] == 99 and 99 not in sample_indices(100, 12, "released")
    assert sample_indices(12, 12) == list(range(12))
    assert sample_indices(5, 12, short="all") == list(range(5))
    with pytest.raises(ValueError, match="^k: asked for 12 frames but the scene has only 5"):
        sample_indices(5, 12)
    with pytest.raises(ValueError, match="^rule:"):
        sample_indices(100, 12, rule="random")
    with pytest.raises(ValueError, match="^frame_ids: duplicate"):
        sort_frame_ids(["7", "007"])
    with pytest.raises(ValueError, match="^frame_ids: expected numeric"):
        sort_frame_ids(["color"])


# ----------------------------------------------------------------------------- synthetic room

def test_synthetic_scene_is_deterministic(room):
    again = make_room_scene()
    assert all(np.array_equal(a, b) for a, b in zip(room.rgb, again.rgb))
    assert torch.equal(room.depth, again.depth) and torch.equal(room.cam2world, again.cam2world)
    other = make_room_scene(n_views=2, seed=1)
    assert not torch.equal(other.depth, room.depth[:2])
    assert room.depth.shape == (12, 288, 384) and room.depth.dtype == torch.float32
    assert room.frame_ids[:3] == ["0", "10", "20"]
    assert all(im.shape == (288, 384, 3) and im.dtype == np.uint8 for im in room.rgb)
    assert float(np.std(np.stack(room.rgb))) > 20  # shading and textures vary


def test_ray_cast_depth_agrees_with_backprojection(room):
    """Back-projected points of every view land on the plane of the face they saw (< 1e-3 m)."""
    geo = room_geometry(0, 4)
    planes = geo.face_planes()
    pts, valid = backproject(room.depth, room.K, room.cam2world)
    assert valid.all()
    seen = set()
    for v in range(len(room)):
        _, _, label = geo.render(room.K[v].numpy(), room.cam2world[v].numpy(), 288, 384)
        p = pts[v].numpy().reshape(-1, 3)
        lab = label.reshape(-1)
        resid = np.abs(np.einsum("nj,nj->n", p, planes[lab, :3]) - planes[lab, 3])
        assert resid.max() < 1e-3
        # and within the face's rectangle: inside the bounds of the room or box it belongs to
        lo = np.concatenate([geo.room_lo[None], geo.box_lo])[lab // 6]
        hi = np.concatenate([geo.room_hi[None], geo.box_hi])[lab // 6]
        assert (p >= lo - 1e-3).all() and (p <= hi + 1e-3).all()
        seen |= set(np.unique(lab).tolist())
    assert {6, 7, 8, 9, 10, 11} & seen  # some box faces were seen
    assert {0, 1, 2, 3, 4} <= seen    # all walls and the floor


def test_views_overlap(room):
    """Points seen by view 0 project inside view 1's image with matching depth (shared surface)."""
    pts, _ = backproject(room.depth[:1], room.K[:1], room.cam2world[:1])
    p = pts[0].reshape(-1, 3).double()
    T1 = torch.linalg.inv(room.cam2world[1])
    cam = p @ T1[:3, :3].T + T1[:3, 3]
    uv = cam @ room.K[1].T
    u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
    inside = (cam[:, 2] > 0) & (u > -0.5) & (u < 383.5) & (v > -0.5) & (v < 287.5)
    iu, iv = torch.round(u[inside]).long(), torch.round(v[inside]).long()
    agree = (room.depth[1][iv, iu].double() - cam[inside, 2]).abs() < 0.02
    assert inside.float().mean() > 0.3 and agree.float().mean() > 0.7  # the rest: occlusions


@pytest.mark.parametrize("color_ext", ["png", "jpg"])
def test_write_read_round_trip(room, tmp_path, color_ext):
    scene = room.select([0, 5, 11])
    path = write_scannet_layout(scene, str(tmp_path), "scene_synth", color_ext=color_ext)
    back = load_scannet_scene(path)
    assert back.frame_ids == ["0", "50", "110"]  # numeric, not lexicographic ("110" < "50")
    assert torch.equal(back.cam2world, scene.cam2world) and torch.equal(back.K, scene.K) and back.K_color is None
    mm = torch.round(scene.depth.double() * 1000) / 1000
    assert torch.allclose(back.depth.double(), mm, atol=1e-6, rtol=0)
    if color_ext == "png":
        assert all(np.array_equal(a, b) for a, b in zip(back.rgb, scene.rgb))
    else:
        diff = np.abs(np.stack(back.rgb).astype(int) - np.stack(scene.rgb).astype(int))
        assert diff.mean() < 2.0
    assert back.scene_id == "scene_synth"


# ----------------------------------------------------------------------------- canvas preparation

def expand2square_resize(img, fill, size=384):
    """LLaVA-NeXT expand2square (offset (L−side)//2) then the SigLIP processor's bicubic resize."""
    h, w = img.shape[:2]
    side = max(h, w)
    sq = Image.new("RGB", (side, side), fill)
    sq.paste(Image.fromarray(img), ((side - w) // 2, (side - h) // 2))
    return np.asarray(sq.resize((size, size), Image.BICUBIC))


def segpruner_resize_and_pad(img, size=384):
    h, w = img.shape[:2]
    sw, sh = size / w, size / h
    nw, nh = (size, min(math.ceil(h * sw), size)) if sw < sh else (min(math.ceil(w * sh), size), size)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(Image.fromarray(img).resize((nw, nh), Image.NEAREST), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def test_prepare_views_pixels_match_both_pipelines(room):
    scene = room.select([0, 1])
    mean = prepare_views(scene, padding="mean")
    black = prepare_views(scene, padding="black")
    assert mean.order == "pad_then_resize" and black.order == "resize_then_pad" and mean.fill == (127, 127, 127)
    for i in range(2):
        assert np.array_equal(mean.images[i], expand2square_resize(scene.rgb[i], (127, 127, 127)))
        assert np.array_equal(black.images[i], segpruner_resize_and_pad(scene.rgb[i]))
    # 384×288 is already at scale 1: both put the image rows at 48..335, depth copied unchanged
    for p in (mean, black):
        assert torch.equal(p.depth[:, 48:336], scene.depth) and (p.depth[:, :48] == 0).all()
        assert torch.allclose(p.K[:, 1, 2], scene.K[:, 1, 2] + 48)
    pv = black.pixel_values()
    assert pv.shape == (2, 3, 384, 384) and pv.min() >= -1 and pv.max() <= 1
    assert torch.allclose(pv[0, :, 0, 0], torch.full((3,), -1.0))  # black padding → −1
    cent, ok = black.patch_centroids()
    assert cent.shape == (2, 729, 3)
    # padding rows 0..47 and 336..383: patch rows 0..2 (pixels 0..41) and 24..26 (336..377) are
    # empty; rows 3 (42..55) to 23 (322..335) hold image pixels
    assert not ok[:, :81].any() and ok[:, 81:648].all() and not ok[:, 648:].any()


def render_views(geo, Ks, poses, hw):
    rgb, depth, labels = [], [], []
    for K, T in zip(Ks, poses):
        c, d, lab = geo.render(K, T, *hw)
        rgb.append(c)
        depth.append(d.astype(np.float32))
        labels.append(lab)
    return rgb, np.stack(depth), labels


def K_fov(w, h, hfov_deg):
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])


def test_registration_with_different_colour_and_depth_sizes():
    """Depth 1152×864, colour 576×432 of the same camera: canvas pixel (i, j) ↔ depth (3(i−48)+1, 3j+1)."""
    geo = room_geometry(0, 4)
    poses = [look_at(np.array([2.0 * math.cos(a), 2.0 * math.sin(a), 1.5]), np.array([0, 0, 0.5])) for a in (0.3, 2.0)]
    Kd = K_fov(1152, 864, 70.0)
    Kc = resize_intrinsics(torch.from_numpy(Kd), (864, 1152), (432, 576)).numpy()
    rgb, _, _ = render_views(geo, [Kc, Kc], poses, (432, 576))
    _, depth, labels = render_views(geo, [Kd, Kd], poses, (864, 1152))
    scene = SceneViews(rgb=rgb, depth=torch.from_numpy(depth), K=torch.from_numpy(np.stack([Kd, Kd])),
                       cam2world=torch.from_numpy(np.stack(poses)), frame_ids=["0", "1"],
                       K_color=torch.from_numpy(np.stack([Kc, Kc])))
    for register in ("reproject", "independent"):
        p = prepare_views(scene, padding="black", register=register)
        rows = torch.arange(48, 336)
        expect = scene.depth[:, 3 * (rows - 48) + 1][:, :, 3 * torch.arange(384) + 1]
        assert torch.equal(p.depth[:, 48:336], expect), register
        assert (p.depth[:, :48] == 0).all() and (p.depth[:, 336:] == 0).all()
    # the canvas points lie on the faces the depth pixels saw
    pts, valid = p.backproject()
    planes = geo.face_planes()
    for v in range(2):
        lab = labels[v][3 * (np.arange(48, 336) - 48) + 1][:, 3 * np.arange(384) + 1]
        q = pts[v, 48:336].numpy()
        assert np.abs(np.einsum("hwj,hwj->hw", q, planes[lab, :3]) - planes[lab, 3]).max() < 1e-4


def test_reprojection_registers_a_different_colour_camera():
    """Colour hfov 60° 576×432, depth hfov 75° 640×480 (ScanNet-like): reprojected canvas depth
    matches the depth rendered directly at the canvas intrinsics; independent resizing does not."""
    geo = room_geometry(0, 4)
    pose = look_at(np.array([2.0, 0.3, 1.5]), np.array([0, 0, 0.5]))
    Kc, Kd = K_fov(576, 432, 60.0), K_fov(640, 480, 75.0)
    rgb, _, _ = render_views(geo, [Kc], [pose], (432, 576))
    _, depth, _ = render_views(geo, [Kd], [pose], (480, 640))
    scene = SceneViews(rgb=rgb, depth=torch.from_numpy(depth), K=torch.from_numpy(Kd[None]),
                       cam2world=torch.from_numpy(pose[None]), frame_ids=["0"], K_color=torch.from_numpy(Kc[None]))
    reg = prepare_views(scene, padding="black", register="reproject")
    ind = prepare_views(scene, padding="black", register="independent")
    Kcan = transform_intrinsics(torch.from_numpy(Kc), square_transform(432, 576, 384, "resize_then_pad"))
    assert torch.allclose(reg.K[0], Kcan)
    _, direct, _ = geo.render(Kcan.numpy(), pose, 384, 384)
    content = reg.content_mask()[0]
    good_reg = ((reg.depth[0] - torch.from_numpy(direct).float()).abs() < 0.02)[content].float().mean()
    good_ind = ((ind.depth[0] - torch.from_numpy(direct).float()).abs() < 0.02)[content].float().mean()
    assert good_reg > 0.97 and good_ind < 0.8


def test_prepare_views_argument_errors(room):
    with pytest.raises(ValueError, match="^padding:"):
        prepare_views(room.select([0]), padding="white")
    with pytest.raises(ValueError, match="^register:"):
        prepare_views(room.select([0]), register="warp")
    with pytest.raises(TypeError, match="^views:"):
        prepare_views([room.rgb[0]])
    with pytest.raises(ValueError, match="^K:"):
        SceneViews(rgb=room.rgb[:2], depth=room.depth[:2], K=room.K[:1], cam2world=room.cam2world[:2], frame_ids=["0", "1"])
    with pytest.raises(ValueError, match="^rgb:"):
        SceneViews(rgb=room.rgb[:1], depth=room.depth[:2], K=room.K[:2], cam2world=room.cam2world[:2], frame_ids=["0", "1"])


# ----------------------------------------------------------------------------- loaders on fixtures

def test_scannet_loader_fixture():
    d = os.path.join(FIX, "scannet", "scene0000_00")
    with pytest.raises(ValueError, match=r"^cam2world: .*\['10'\]"):
        load_scannet_scene(d)
    with pytest.warns(UserWarning, match="dropped frame"):
        v = load_scannet_scene(d, on_invalid_pose="exclude")
    assert v.frame_ids == ["0", "2"]
    keep = load_scannet_scene(d, on_invalid_pose="keep")
    assert keep.frame_ids == ["0", "2", "10"] and torch.isinf(keep.cam2world[2]).all()
    assert v.depth.shape == (2, 6, 8) and v.depth[0, 0, 0] == 0
    assert v.depth[0, 1, 1].item() == pytest.approx(1.0) and v.depth[1, 1, 1].item() == pytest.approx(1.25)
    assert torch.equal(v.K[0], torch.tensor([[7.0, 0, 3.5], [0, 7.5, 2.5], [0, 0, 1]], dtype=torch.float64))
    assert torch.equal(v.K_color[0], torch.tensor([[14.5, 0, 7.25], [0, 14.5, 5.75], [0, 0, 1]], dtype=torch.float64))
    a = math.radians(30)
    assert v.cam2world[1, :3, 3].tolist() == pytest.approx([2.0, 2.0, 1.5])
    assert v.cam2world[1, 0, 0].item() == pytest.approx(math.cos(a), abs=1e-6)
    assert v.rgb[0].shape == (12, 16, 3)
    sub = load_scannet_scene(d, frame_ids=["2"])
    assert sub.frame_ids == ["2"]
    with pytest.raises(ValueError, match="^frame_ids:"):
        load_scannet_scene(d, frame_ids=["3"])
    p = prepare_views(v, padding="black")
    assert p.depth.shape == (2, 384, 384) and p.K.shape == (2, 3, 3)


def test_scannet_default_intrinsics_when_missing():
    d = os.path.join(FIX, "scannet_nointr", "scene0001_00")
    with pytest.warns(UserWarning, match="default depth intrinsics"):
        v = load_scannet_scene(d)
    # 640×480 default resized to 64×48: f·0.1, centre (31.5, 23.5)
    assert v.K[0].tolist()[0] == pytest.approx([57.7590698, 0, 31.5])
    assert v.K[0].tolist()[1] == pytest.approx([0, 57.8729797, 23.5])
    assert v.K_color is None


def test_openeqa_hm3d_episode_depth_scale_and_pose_convention():
    d = os.path.join(FIX, "openeqa", "hm3d-v0", "000-hm3d-TESTSCENE01")
    assert episode_source(d) == "hm3d"
    v = load_openeqa_episode(d)
    assert v.frame_ids == ["000000", "000001"] and v.depth.shape == (2, 18, 32)
    # 2 m was stored as int(2/10·65535) = 13107 → 13107·10/65535 = 2 exactly (v/1000 would give 13.1)
    raw = np.asarray(Image.open(os.path.join(d, "000000-depth.png")))
    assert raw[5, 5] == 13107 and v.depth[0, 5, 5].item() == pytest.approx(2.0, abs=1e-6)
    assert v.depth[1, 5, 5].item() == pytest.approx(int(3.0 / 10 * 65535) * 10 / 65535, abs=1e-6)
    assert (v.depth[:, 0, :4] == 0).all()
    # intrinsics: fx = 16 (hfov 90 on 32 px), fy := fx (the file says 19.03), centre −½
    assert v.K[0].tolist() == [[16.0, 0.0, 15.5], [0.0, 16.0, 8.5], [0.0, 0.0, 1.0]]
    # pose: camera at (1, 1.5, 2) yawed 90° about +y looks along world −x (OpenGL −z);
    # after conversion a point 2 m ahead has camera z = +2
    T = v.cam2world[0]
    ahead = torch.tensor([1.0 - 2.0, 1.5, 2.0, 1.0], dtype=torch.float64)
    cam = torch.linalg.inv(T) @ ahead
    assert cam[2].item() == pytest.approx(2.0, abs=1e-5) and abs(cam[0].item()) < 1e-5
    # back-projection of pixel (u, v) = (15, 8): camera (X, Y, Z) = (−0.0625, −0.0625, 2); the OpenCV
    # axes in the world are x → (0, 0, −1), y → (0, −1, 0), z → (−1, 0, 0)
    pts, valid = backproject(v.depth, v.K, v.cam2world)
    assert pts[0, 8, 15].tolist() == pytest.approx([1.0 - 2.0, 1.5 + 0.0625, 2.0 + 0.0625], abs=1e-4)
    raw_fy = load_openeqa_episode(d, square_pixels=False)
    assert raw_fy.K[0, 1, 1].item() == pytest.approx(19.028901)


def test_openeqa_scannet_episode():
    d = os.path.join(FIX, "openeqa", "scannet-v0", "002-scannet-scene0709_00")
    assert episode_source("scannet-v0/002-scannet-scene0709_00") == "scannet"
    v = load_openeqa_episode(d)
    assert v.frame_ids == ["000000", "000001", "000002"]
    assert v.depth[2, 3, 3].item() == pytest.approx(2.2)
    assert v.K[0, 0, 0].item() == 7.0 and v.K_color[0, 0, 0].item() == 14.5
    assert v.cam2world[1, :3, 3].tolist() == pytest.approx([0.5, 0.0, 1.2])
    with pytest.raises(ValueError, match="^episode_history:"):
        episode_source("other-v0/xyz")


def test_question_loaders():
    qs = load_scanqa(os.path.join(FIX, "scanqa_val.json"))
    assert len(qs) == 3 and qs[0].answers == ("brown", "dark brown") and qs[0].object_ids == (4, 5)
    assert qs[2].scene_id == "scene0001_00" and qs[2].object_names == ("lamp", "lamp")
    test = load_scanqa(os.path.join(FIX, "scanqa_test_wo_obj.json"))
    assert test[0].answers is None and test[0].object_ids is None
    oq = load_openeqa(os.path.join(FIX, "openeqa.json"))
    assert [q.source for q in oq] == ["scannet", "scannet", "hm3d"]
    assert oq[0].extra_answers is None and oq[1].answers == ("On the table", "On the kitchen table", "Table")
    assert oq[0].scene_id == "scene0709_00" and oq[2].scene_id == "TESTSCENE01"


def test_question_loader_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "question_id": 3, "scene_id": "s"}]))
    with pytest.raises(ValueError, match="entry 0: 'question_id' must be a string"):
        load_scanqa(str(bad))
    bad.write_text(json.dumps([{"question": "q", "answer": "a", "category": "c", "question_id": "1",
                                "episode_history": "hm3d-v0/000-hm3d-X", "extra_answers": "a"}]))
    with pytest.raises(ValueError, match="'extra_answers' must be a list"):
        load_openeqa(str(bad))


# ----------------------------------------------------------------------------- sampler CLI

def _cli():
    spec = importlib.util.spec_from_file_location("sample_frames_cli", os.path.join(ROOT, "eval", "LLaVA-NeXT", "sample_frames.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_samples_scannet_layout_and_resumes(tmp_path, capsys):
    cli = _cli()
    scene = make_room_scene(n_views=30, height=24, width=32, frame_step=1)
    src = tmp_path / "frames_square"
    write_scannet_layout(scene, str(src), "scene0000_00")
    out = tmp_path / "frames12"
    cli.main(["--root", str(src), "--out", str(out)])
    want = [str(round(i * 29 / 12)) for i in range(12)]
    for sub, ext in (("color", ".jpg"), ("depth", ".png"), ("pose", ".txt")):
        got = sorted(os.path.splitext(n)[0] for n in os.listdir(out / "scene0000_00" / sub))
        assert sort_frame_ids(got) == want and all(n.endswith(ext) for n in os.listdir(out / "scene0000_00" / sub))
    back = load_scannet_scene(str(out / "scene0000_00"))
    full = load_scannet_scene(str(src / "scene0000_00"))
    idx = [full.frame_ids.index(f) for f in want]
    assert torch.equal(back.depth, full.depth[idx]) and torch.equal(back.cam2world, full.cam2world[idx])
    with open(out / "scene0000_00" / "color" / f"{want[1]}.jpg", "rb") as a, \
            open(src / "scene0000_00" / "color" / f"{want[1]}.jpg", "rb") as b:
        assert a.read() == b.read()  # byte copies
    capsys.readouterr()
    cli.main(["--root", str(src), "--out", str(out)])
    assert "0 written, 1 already complete" in capsys.readouterr().out
    cli.main(["--root", str(src), "--out", str(out), "--k", "4", "--rule", "linspace"])
    assert sorted(os.listdir(out / "scene0000_00" / "pose")) == sorted(f"{i}.txt" for i in (0, 10, 19, 29))
    meta = json.loads((out / "scene0000_00" / "frames.json").read_text())
    assert meta["frame_ids"] == ["0", "10", "19", "29"] and meta["rule"] == "linspace"
    with pytest.raises(SystemExit, match="--out"):
        cli.main(["--root", str(src), "--out", str(src / "inside")])


def test_cli_converts_openeqa_hm3d_and_skips_bad_poses(tmp_path):
    cli = _cli()
    src = tmp_path / "frames"
    shutil.copytree(os.path.join(FIX, "openeqa"), src)
    out = tmp_path / "out"
    cli.main(["--root", str(src), "--out", str(out), "--questions", os.path.join(FIX, "openeqa.json"), "--k", "2"])
    hm = "hm3d-v0/000-hm3d-TESTSCENE01"
    ref = load_openeqa_episode(str(src / hm))
    got = load_scannet_scene(str(out / hm))
    assert got.frame_ids == ref.frame_ids
    assert torch.allclose(got.depth, ref.depth, atol=5e-4, rtol=0)  # re-encoded in mm
    assert torch.allclose(got.cam2world, ref.cam2world, atol=1e-12) and torch.allclose(got.K, ref.K)
    sc = "scannet-v0/002-scannet-scene0709_00"
    got = load_scannet_scene(str(out / sc))
    ref = load_openeqa_episode(str(src / sc))
    assert got.frame_ids == ["000000", "000001"]  # released rule, k = 2 of 3: round(0), round(1)
    assert torch.equal(got.depth, ref.depth[:2]) and torch.equal(got.K_color, ref.K_color[:2])
    # ScanNet layout with a -inf pose: --valid-poses-only samples around it
    ssrc = tmp_path / "scannet"
    shutil.copytree(os.path.join(FIX, "scannet"), ssrc)
    cli.main(["--root", str(ssrc), "--out", str(tmp_path / "o2"), "--k", "2", "--rule", "linspace", "--valid-poses-only"])
    assert sorted(os.listdir(tmp_path / "o2" / "scene0000_00" / "pose")) == ["0.txt", "2.txt"]
    cli.main(["--root", str(ssrc), "--out", str(tmp_path / "o3"), "--k", "2", "--rule", "linspace"])
    assert sorted(os.listdir(tmp_path / "o3" / "scene0000_00" / "pose")) == ["0.txt", "10.txt"]
