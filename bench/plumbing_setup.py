"""Data and teacher for the plumbing check in BENCHMARKS.md: a PACS subset (the first N images of
each domain and class, copied) and a tiny open_clip model with random weights (the tests'
configuration), saved as OUT/teacher/dgkit-tiny-clip.json + tiny_clip.safetensors, which dgkit
loads through its one teacher path as `dgkit-tiny-clip:OUT/teacher/tiny_clip.safetensors`.

    python bench/plumbing_setup.py ../shared/datasets/PACS plumbing --per-class 30
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="PACS root: <domain>/<class>/<image>")
    parser.add_argument("out", type=Path, help="writes OUT/pacs_small and OUT/teacher")
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args()

    from dgkit.distill.teacher_train import write_random_clip
    from dgkit.preprocess import IMAGE_SUFFIXES

    subset = args.out / "pacs_small"
    for domain in sorted(p for p in args.data.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            images = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            folder = subset / domain.name / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for image in images[:args.per_class]:
                shutil.copy2(image, folder / image.name)
    teacher = write_random_clip(args.out / "teacher")
    print(f"wrote {subset} and the teacher {teacher}")


if __name__ == "__main__":
    main()
