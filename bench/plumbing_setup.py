"""Data and teacher for the plumbing check in BENCHMARKS.md: a PACS subset (the first N images of
each domain and class, copied) and a tiny open_clip model with random weights (the tests'
configuration), saved as OUT/teacher/dgkit-tiny-clip.json + tiny_clip.safetensors, which dgkit
loads through its one teacher path as `dgkit-tiny-clip:OUT/teacher/tiny_clip.safetensors`.

    python bench/plumbing_setup.py ../shared/datasets/PACS plumbing --per-class 30
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TINY_CLIP_CONFIG = {  # tests/conftest.py's
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="PACS root: <domain>/<class>/<image>")
    parser.add_argument("out", type=Path, help="writes OUT/pacs_small and OUT/teacher")
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args()

    import open_clip
    import torch
    from safetensors.torch import save_file

    from dgkit.preprocess import IMAGE_SUFFIXES

    subset = args.out / "pacs_small"
    for domain in sorted(p for p in args.data.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            images = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            folder = subset / domain.name / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for image in images[:args.per_class]:
                shutil.copy2(image, folder / image.name)
    teacher = args.out / "teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    config = teacher / "dgkit-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("dgkit-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(teacher / "tiny_clip.safetensors"))
    print(f"wrote {subset} and dgkit-tiny-clip:{teacher / 'tiny_clip.safetensors'}")


if __name__ == "__main__":
    main()
