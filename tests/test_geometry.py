"""shared.geometry: square canvases, intrinsics, back-projection, patch centroids, poses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.geometry import (
    backproject,
    check_poses,
    opengl_to_opencv,
    patch_centroids,
    patch_valid_fraction,
    resize_intrinsics,
    square_transform,
    transform_intrinsics,
)


def K_of(fx, fy, cx, cy):
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rigid(yaw_deg, pitch_deg, t):
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    Rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    T = np.eye(4)
    T[:3, :3] = Rz @ Rx
    T[:3, 3] = t
    return torch.from_numpy(T)


# ----------------------------------------------------------------------------- square transform

@pytest.mark.parametrize(
    "hw, scale_xy, pad, resized",
    [
        ((480, 640), (0.6, 0.6), (0, 48), (384, 288)),            # ScanNet depth
        ((968, 1296), (384 / 1296, 287 / 968), (0, 48), (384, 287)),  # ScanNet colour: ceil(286.81) = 287
        ((1080, 1920), (0.2, 0.2), (0, 84), (384, 216)),          # HM3D
        ((640, 480), (0.6, 0.6), (48, 0), (288, 384)),            # portrait
        ((384, 384), (1.0, 1.0), (0, 0), (384, 384)),
    ],
)
def test_resize_then_pad_matches_segpruner_rounding(hw, scale_xy, pad, resized):
    tf = square_transform(*hw, size=384, order="resize_then_pad")
    assert (tf.resized_width, tf.resized_height) == resized
    assert (tf.pad_x, tf.pad_y) == pad
    assert tf.scale_x == pytest.approx(scale_xy[0], abs=1e-15) and tf.scale_y == pytest.approx(scale_xy[1], abs=1e-15)


def test_pad_then_resize_offsets():
    tf = square_transform(968, 1296, 384, "pad_then_resize")
    assert (tf.pre_pad_x, tf.pre_pad_y) == (0, 164)          # (1296 - 968) // 2
    assert tf.scale_x == tf.scale_y == 384 / 1296
    assert tf.pad_y == pytest.approx(164 * 384 / 1296)        # 48.59: fractional in output pixels
    tf = square_transform(480, 640, 384, "pad_then_resize")
    assert tf.pad_y == pytest.approx(48.0) and tf.pad_x == 0.0


def test_canvas_coordinates_round_trip():
    tf = square_transform(968, 1296, 384, "resize_then_pad")
    u = torch.tensor([0.0, 100.5, 1295.0])
    v = torch.tensor([0.0, 483.5, 967.0])
    uc, vc = tf.to_canvas(u, v)
    # pixel-centre convention: the image's corners (-0.5, -0.5) land on the content box corners
    x0, y0, x1, y1 = tf.content_box
    cu, cv = tf.to_canvas(torch.tensor([-0.5, 1295.5]), torch.tensor([-0.5, 967.5]))
    assert cu.tolist() == pytest.approx([x0 - 0.5, x1 - 0.5]) and cv.tolist() == pytest.approx([y0 - 0.5, y1 - 0.5])
    ub, vb = tf.from_canvas(uc, vc)
    assert torch.allclose(ub, u.double()) and torch.allclose(vb, v.double())


@pytest.mark.parametrize("order", ["resize_then_pad", "pad_then_resize"])
@pytest.mark.parametrize("hw", [(480, 640), (968, 1296), (1080, 1920), (700, 500)])
def test_content_mask_matches_pil_nearest(order, hw):
    """The transform's content box equals where PIL's NEAREST pipeline puts the image."""
    from PIL import Image

    h, w = hw
    tf = square_transform(h, w, 384, order)
    white = Image.new("L", (w, h), 255)
    if order == "resize_then_pad":  # SeGPruner's resize_and_pad_image, written from its description
        sw, sh = 384 / w, 384 / h
        nw, nh = (384, min(math.ceil(h * sw), 384)) if sw < sh else (min(math.ceil(w * sh), 384), 384)
        canvas = Image.new("L", (384, 384), 0)
        canvas.paste(white.resize((nw, nh), Image.NEAREST), ((384 - nw) // 2, (384 - nh) // 2))
    else:  # expand2square then resize
        side = max(h, w)
        sq = Image.new("L", (side, side), 0)
        sq.paste(white, ((side - w) // 2, (side - h) // 2))
        canvas = sq.resize((384, 384), Image.NEAREST)
    expected = torch.from_numpy(np.asarray(canvas) > 0)
    assert torch.equal(tf.content_mask(), expected)


def test_square_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="^order:"):
        square_transform(10, 10, 384, order="crop")
    with pytest.raises(ValueError, match="^height:"):
        square_transform(0, 10)


# ----------------------------------------------------------------------------- intrinsics

def test_transform_intrinsics_hand_values():
    # ScanNet default depth K at 640×480 → the 384 canvas: SeGPruner's (346.5546, 347.238, 191.5)
    # plus the pad the released code forgets: cy = 143.5 + 48 = 191.5
    K = K_of(577.590698, 578.729797, 319.5, 239.5)
    Kp = transform_intrinsics(K, square_transform(480, 640, 384, "resize_then_pad"))
    assert Kp[0, 0].item() == pytest.approx(346.5544188)
    assert Kp[1, 1].item() == pytest.approx(347.2378782)
    assert Kp[0, 2].item() == pytest.approx(191.5) and Kp[1, 2].item() == pytest.approx(191.5)
    # HM3D 1920×1080, fx = fy = 960, centre (959.5, 539.5): fx' = 192, cy' = 107.5 + 84
    Kp = transform_intrinsics(K_of(960, 960, 959.5, 539.5), square_transform(1080, 1920, 384, "resize_then_pad"))
    assert torch.allclose(Kp, K_of(192, 192, 191.5, 191.5), atol=1e-12)
    # portrait 480×640 (W×H): the pad is horizontal, cx' = 0.6·(239.5 + ½) − ½ + 48
    Kp = transform_intrinsics(K_of(500, 500, 239.5, 319.5), square_transform(640, 480, 384, "pad_then_resize"))
    assert torch.allclose(Kp, K_of(300, 300, 191.5, 191.5), atol=1e-12)
    # batched with per-view transforms
    tfs = [square_transform(480, 640, 384, o) for o in ("resize_then_pad", "pad_then_resize")]
    Kb = transform_intrinsics(K.expand(2, 3, 3), tfs)
    assert Kb.shape == (2, 3, 3) and torch.allclose(Kb[0], Kb[1])  # 640×480: both orders agree


def test_resize_intrinsics_centre_stays_centre():
    K = K_of(500, 500, 319.5, 239.5)
    Kr = resize_intrinsics(K, (480, 640), (968, 1296))
    assert Kr[0, 2].item() == pytest.approx((1296 - 1) / 2) and Kr[1, 2].item() == pytest.approx((968 - 1) / 2)


def tilted_plane_depth(h, w, K, n, c):
    """Exact z-depth of the plane n·X = c (camera frame) at every pixel centre."""
    Kinv = np.linalg.inv(K.numpy())
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ Kinv.T
    return c / (rays @ np.asarray(n))


@pytest.mark.parametrize("order", ["resize_then_pad", "pad_then_resize"])
@pytest.mark.parametrize("portrait", [False, True])
def test_canvas_depth_backprojects_to_the_same_plane(order, portrait):
    """1152×864 → 384: canvas pixel (i, j) samples source pixel (3(i−48)+1, 3j+1) in both orders
    (rows and columns swapped for the portrait 864×1152 image)."""
    from shared.datasets.views import square_image

    h, w = (1152, 864) if portrait else (864, 1152)
    K = K_of(900.0, 880.0, (w - 1) / 2 + 3.0, (h - 1) / 2 - 5.0)
    n, c = np.array([0.2, -0.3, 1.0]), 2.5
    depth = tilted_plane_depth(h, w, K, n, c).astype(np.float32)
    depth[100:130, 200:260] = 0.0  # a hole stays a hole
    tf = square_transform(h, w, 384, order)
    canvas = torch.from_numpy(np.array(square_image(depth, tf, 0.0, "nearest")))
    Kc = transform_intrinsics(K, tf)
    pts_c, val_c = backproject(canvas[None].double(), Kc)
    pts_s, val_s = backproject(torch.from_numpy(depth)[None].double(), K)
    inner = torch.arange(48, 336)
    if portrait:
        pts_c, val_c = pts_c.transpose(1, 2), val_c.transpose(1, 2)  # index as [column, row]
        pts_s, val_s = pts_s.transpose(1, 2), val_s.transpose(1, 2)
    src_inner, src_full = 3 * (inner - 48) + 1, 3 * torch.arange(384) + 1
    assert torch.equal(val_c[0, inner], val_s[0][src_inner][:, src_full])
    assert torch.allclose(pts_c[0, inner], pts_s[0][src_inner][:, src_full], atol=1e-9, rtol=0)
    assert not val_c[0, :48].any() and not val_c[0, 336:].any()  # padding: depth 0 → invalid
    p = pts_c[0][val_c[0]].numpy()
    assert np.abs(p @ n - c).max() < 1e-5  # planar, at the right place


@pytest.mark.parametrize("order", ["resize_then_pad", "pad_then_resize"])
def test_fronto_plane_position_under_fractional_resize(order):
    """640×480 → 384 (scale 0.6): canvas points sit on the source rays (analytic, pixel centres)."""
    from shared.datasets.views import square_image

    K = K_of(577.59, 578.73, 319.5, 239.5)
    z = 1.7
    depth = np.full((480, 640), z, dtype=np.float32)
    tf = square_transform(480, 640, 384, order)
    canvas = torch.from_numpy(np.array(square_image(depth, tf, 0.0, "nearest")))[None].double()
    pts, valid = backproject(canvas, transform_intrinsics(K, tf))
    assert valid[0, 48:336].all() and not valid[0, :48].any() and not valid[0, 336:].any()
    j = torch.arange(384, dtype=torch.float64)
    u_src = (j + 0.5) / 0.6 - 0.5              # canvas column centre in source pixels
    v_src = (torch.arange(48, 336, dtype=torch.float64) - 48 + 0.5) / 0.6 - 0.5
    assert torch.allclose(pts[0, 100, :, 0], (u_src - 319.5) / 577.59 * z, atol=1e-9)
    assert torch.allclose(pts[0, 48:336, 7, 1], (v_src - 239.5) / 578.73 * z, atol=1e-9)
    assert torch.allclose(pts[0, 48:336, :, 2], torch.full((288, 384), z, dtype=torch.float64))


# ----------------------------------------------------------------------------- back-projection and patches

def fronto_views(z=2.0, V=2, size=384, f=300.0):
    depth = torch.full((V, size, size), z, dtype=torch.float64)
    K = K_of(f, f, (size - 1) / 2, (size - 1) / 2)
    return depth, K


def analytic_centroids(z, f, c, grid=27, patch=14):
    idx = torch.arange(grid, dtype=torch.float64) * patch + (patch - 1) / 2  # mean pixel of a patch
    X = (idx - c) / f * z
    cx = X[None, :].expand(grid, grid)  # column → x
    cy = X[:, None].expand(grid, grid)  # row → y
    return torch.stack([cx, cy, torch.full((grid, grid), z, dtype=torch.float64)], -1).reshape(grid * grid, 3)


def test_fronto_plane_patch_centroids_identity_and_rigid_pose():
    z, f = 2.0, 300.0
    depth, K = fronto_views(z, V=2, f=f)
    expected_cam = analytic_centroids(z, f, 191.5)
    T = torch.stack([torch.eye(4, dtype=torch.float64), rigid(40.0, -25.0, [1.0, -2.0, 0.5])])
    pts, valid = backproject(depth, K, T)
    cent, ok = patch_centroids(pts, valid)
    assert cent.shape == (2, 729, 3) and ok.all()
    assert torch.allclose(cent[0], expected_cam, atol=1e-12)
    R, t = T[1, :3, :3], T[1, :3, 3]
    assert torch.allclose(cent[1], expected_cam @ R.T + t, atol=1e-12)
    # camera frame when no pose is given
    pc, _ = backproject(depth, K)
    assert torch.allclose(patch_centroids(pc, valid)[0][1], expected_cam, atol=1e-12)


def test_row_major_token_order():
    depth, K = fronto_views(V=1)
    pts, valid = backproject(depth, K)
    cent, _ = patch_centroids(pts, valid)
    # token 1 is one patch to the right (+x), token 27 one patch down (+y)
    d1, d27 = cent[0, 1] - cent[0, 0], cent[0, 27] - cent[0, 0]
    assert d1[0] > 0 and d1[1] == 0 and d27[1] > 0 and d27[0] == 0


def test_invalid_depth_excluded_and_empty_patch_flagged():
    z, f = 2.0, 300.0
    depth, K = fronto_views(z, V=1, f=f)
    depth = depth.clone()
    depth[0, 0, 0] = 0.0
    depth[0, 0, 1] = float("nan")
    depth[0, 0, 2] = float("inf")
    depth[0, 0, 3] = -1.0
    depth[0, 14:28, 0:14] = 0.0          # patch (1, 0): no valid pixel
    depth[0, 14:28, 14:28] = float("nan")  # patch (1, 1): no valid pixel
    pts, valid = backproject(depth, K)
    assert torch.isfinite(pts).all()
    assert not valid[0, 0, :4].any() and (pts[0, 0, :4] == 0).all()
    cent, ok = patch_centroids(pts, valid)
    assert not ok[0, 27] and not ok[0, 28] and (cent[0, 27] == 0).all() and (cent[0, 28] == 0).all()
    assert ok.sum() == 727
    # patch 0: mean of its 192 valid pixels, computed directly
    v, u = np.mgrid[0:14, 0:14]
    keep = np.ones((14, 14), bool)
    keep[0, :4] = False
    X = ((u - 191.5) / f * z)[keep].mean()
    Y = ((v - 191.5) / f * z)[keep].mean()
    assert cent[0, 0].tolist() == pytest.approx([X, Y, z], abs=1e-12)
    frac = patch_valid_fraction(valid)
    assert frac[0, 0].item() == pytest.approx(192 / 196) and frac[0, 27] == 0 and frac[0, 2] == 1


def released_patch_world(K, depth, cam2world, patch=14):
    """SeGPruner's compute_projection + patch_word, re-written from its description (one view)."""
    H, W = depth.shape
    u, v = torch.meshgrid(torch.arange(W, dtype=torch.float64), torch.arange(H, dtype=torch.float64), indexing="xy")
    X = (u - K[0, 2]) / K[0, 0] * depth
    Y = (v - K[1, 2]) / K[1, 1] * depth
    hom = torch.stack([X, Y, depth, torch.ones_like(depth)], -1).reshape(-1, 4)
    world = (hom @ cam2world.T)[:, :3].reshape(H, W, 3)
    hp, wp = H // patch, W // patch
    world = world[: hp * patch, : wp * patch].reshape(hp, patch, wp, patch, 3)
    return (world.sum(dim=(1, 3)) / (patch * patch)).reshape(-1, 3)


def test_compat_released_reproduces_zero_averaging():
    g = torch.Generator().manual_seed(0)
    depth = 1.0 + 3.0 * torch.rand(2, 384, 384, generator=g, dtype=torch.float64)
    depth[:, :48] = 0.0   # padding rows
    depth[:, 336:] = 0.0
    depth[0, 100:120, 50:90] = 0.0  # holes
    K = K_of(346.55, 347.24, 191.5, 191.5)
    T = torch.stack([torch.eye(4, dtype=torch.float64), rigid(-70.0, 15.0, [3.0, 1.0, 1.4])])
    pts, valid = backproject(depth, K, T)
    cent, ok = patch_centroids(pts, valid, compat_released=True, camera_centers=T[:, :3, 3])
    for i in range(2):
        ref = released_patch_world(K, depth[i], T[i])
        assert torch.allclose(cent[i], ref, atol=1e-10)
    # padding tokens collapse towards the camera centre in compat mode, are invalid otherwise
    assert torch.allclose(cent[1, 0], T[1, :3, 3]) and not ok[1, 0]
    clean, _ = patch_centroids(pts, valid)
    assert not torch.allclose(clean, cent)


def test_dtype_follows_inputs():
    depth32 = torch.full((1, 28, 28), 1.0, dtype=torch.float32)
    K32 = K_of(20, 20, 13.5, 13.5).float()
    pts, _ = backproject(depth32, K32)
    assert pts.dtype == torch.float32
    pts, _ = backproject(depth32, K32.double())
    assert pts.dtype == torch.float64


# ----------------------------------------------------------------------------- poses

def test_non_finite_pose_raises_naming_the_view_or_is_excluded():
    T = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    T[2] = float("-inf")
    with pytest.raises(ValueError, match=r"^cam2world: view 2 .*non-finite"):
        check_poses(T)
    assert check_poses(T, on_invalid="exclude").tolist() == [True, True, False, True]
    depth = torch.full((4, 28, 28), 1.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="view 2"):
        backproject(depth, K_of(20, 20, 13.5, 13.5), T)
    pts, valid = backproject(depth, K_of(20, 20, 13.5, 13.5), T, on_invalid_pose="exclude")
    assert not valid[2].any() and valid[[0, 1, 3]].all() and torch.isfinite(pts).all() and (pts[2] == 0).all()


def test_non_rigid_pose_rejected():
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    T[1, :3, :3] *= 2.0
    with pytest.raises(ValueError, match="view 1 is not a rigid"):
        check_poses(T)
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    T[0, 2, 2] = -1.0  # a reflection
    assert check_poses(T, on_invalid="exclude").tolist() == [False, True]


def test_opengl_to_opencv_point_in_front_has_positive_z():
    # OpenGL camera at (1, 2, 3) yawed 90° about +y (Habitat, y up): it looks along world −x
    a = math.radians(90.0)
    R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    T_gl = torch.eye(4, dtype=torch.float64)
    T_gl[:3, :3], T_gl[:3, 3] = R, torch.tensor([1.0, 2.0, 3.0])
    front = torch.tensor([1.0 - 2.5, 2.0, 3.0, 1.0], dtype=torch.float64)  # 2.5 m ahead
    above = torch.tensor([1.0 - 2.5, 2.4, 3.0, 1.0], dtype=torch.float64)  # and higher up
    T_cv = opengl_to_opencv(T_gl)
    p = torch.linalg.inv(T_cv) @ front
    q = torch.linalg.inv(T_cv) @ above
    assert p[2].item() == pytest.approx(2.5) and abs(p[0].item()) < 1e-12 and abs(p[1].item()) < 1e-12
    assert q[1].item() < 0  # up in the world is −y (image up) in OpenCV
    assert (torch.linalg.inv(T_gl) @ front)[2].item() == pytest.approx(-2.5)  # OpenGL: −z ahead
    assert torch.allclose(opengl_to_opencv(T_cv), T_gl)
    assert check_poses(T_cv[None]).all()


# ----------------------------------------------------------------------------- argument errors

def test_shape_mismatches_name_the_parameter():
    depth = torch.ones(2, 28, 28)
    K = K_of(20, 20, 13.5, 13.5)
    with pytest.raises(ValueError, match="^depth:"):
        backproject(torch.ones(28, 28), K)
    with pytest.raises(ValueError, match="^K:"):
        backproject(depth, K.expand(3, 3, 3))
    with pytest.raises(ValueError, match="^K:"):
        backproject(depth, torch.eye(4))
    with pytest.raises(ValueError, match="^K:"):
        backproject(depth, K_of(-20, 20, 13.5, 13.5))
    with pytest.raises(ValueError, match="^cam2world:"):
        backproject(depth, K, torch.eye(4).repeat(3, 1, 1))
    pts, valid = backproject(depth, K)
    with pytest.raises(ValueError, match="^grid:"):
        patch_centroids(pts, valid, patch=14, grid=27)
    with pytest.raises(ValueError, match="^valid:"):
        patch_centroids(pts, valid[:1], patch=14, grid=2)
    with pytest.raises(ValueError, match="^camera_centers:"):
        patch_centroids(pts, valid, patch=14, grid=2, compat_released=True, camera_centers=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="^on_invalid:"):
        check_poses(torch.eye(4)[None], on_invalid="drop")
