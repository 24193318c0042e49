"""Scene data for 3D-aware pruning: posed RGB-D views, their square canvas, dataset readers.

- :mod:`.views` — :class:`SceneViews` (frames as read) and :func:`prepare_views` (the vision
  tower's square canvas with registered depth and intrinsics);
- :mod:`.scannet` — ScanNet frame folders and ScanQA questions;
- :mod:`.hm3d` — OpenEQA episode folders (HM3D and ScanNet) and OpenEQA questions;
- :mod:`.frames` — numeric frame order and the fixed 12-frame sampler;
- :mod:`.synthetic_scene` — an exact ray-cast room for tests and demos;
- :mod:`.fast3d_gap` — Chat-Scene annotations + object features as GAP training samples (Fast3D).
- :mod:`.chat_scene_synthetic` — Chat-Scene's annotation folder (object features, boxes, the five val
  annotation files) with deterministic random content, for tests and demos.

Image I/O needs Pillow (``pip install pillow``), imported when first used.
"""
from __future__ import annotations

from .chat_scene_synthetic import SyntheticScenes, write_chat_scene_annotations
from .frames import sample_frames, sample_indices, sort_frame_ids
from .hm3d import (
    HM3D_DEPTH_SCALE,
    OpenEQAQuestion,
    episode_source,
    list_openeqa_frames,
    load_openeqa,
    load_openeqa_episode,
)
from .scannet import (
    SCANNET_DEFAULT_DEPTH_K,
    SCANNET_DEPTH_SCALE,
    ScanQAQuestion,
    list_scannet_frames,
    load_scannet_scene,
    load_scanqa,
)
from .synthetic_scene import make_room_scene, room_geometry, write_scannet_layout
from .views import PreparedViews, SceneViews, prepare_views

__all__ = [
    "HM3D_DEPTH_SCALE",
    "OpenEQAQuestion",
    "PreparedViews",
    "SCANNET_DEFAULT_DEPTH_K",
    "SCANNET_DEPTH_SCALE",
    "ScanQAQuestion",
    "SceneViews",
    "SyntheticScenes",
    "episode_source",
    "list_openeqa_frames",
    "list_scannet_frames",
    "load_openeqa",
    "load_openeqa_episode",
    "load_scannet_scene",
    "load_scanqa",
    "make_room_scene",
    "prepare_views",
    "room_geometry",
    "sample_frames",
    "sample_indices",
    "sort_frame_ids",
    "write_chat_scene_annotations",
    "write_scannet_layout",
]
