"""Training throughput: images per second of whole training steps, data loading included.

Times dgkit's own `Trainer.step` (decoded images held on the device, batched augmentation,
bf16 + channels_last on GPU, optional torch.compile) for ERM, KD with the cached teacher and KD
with the online teacher, beside a plain fp32 eager loop with a standard DataLoader (PIL decode
and torchvision transforms in worker processes), on real images of a domain dataset.

    python bench/train_throughput.py --data ../shared/datasets/PACS --device cuda \
        --students resnet50,efficientnet_lite0 --batch-size 256

The KD teacher is open_clip's ViT-B-16 architecture with random weights (speed only: no
accuracy is measured here). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dgkit.distill.trainer import Trainer
from dgkit.provenance import provenance
from dgkit.rundir import RunDir
from dgkit.train_config import TrainConfig


def random_teacher(folder: Path, model: str = "ViT-B-16") -> str:
    import open_clip
    from safetensors.torch import save_file

    path = folder / f"{model}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        net = open_clip.create_model(model)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return f"{model}:{path}"


def subset(root: Path, per_class: int, folder: Path) -> Path:
    """A symlinked copy with `per_class` images of each domain and class (for slow CPUs)."""
    out = folder / "subset"
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            target = out / domain.name / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(cls.iterdir())[:per_class]:
                (target / image.name).symlink_to(image.resolve())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_dgkit(args, student: str, mode: str, teacher: str | None, work: Path) -> float:
    method, _, rest = mode.partition("-")
    teacher_mode = rest.replace("+compile", "") or "cached"
    config = TrainConfig(
        data=str(args.data), targets=[args.target], method=method.replace("+compile", ""),
        student=student, student_weights="none", teacher=teacher if method == "kd" else None,
        teacher_mode=teacher_mode, steps=args.warmup + args.steps, batch_size=args.batch_size,
        image_size=args.image_size, device=args.device, compile="+compile" in mode)
    run = RunDir(Path(tempfile.mkdtemp(dir=work)))
    trainer = Trainer(config, run, quiet=True)
    session = trainer.setup(trainer.prepare())
    for step in range(args.warmup):
        trainer.step(session, step)
    sync(trainer.device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.step(session, step)
    sync(trainer.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def time_plain(args, student: str) -> float:
    """The baseline: fp32 eager, a map-style Dataset decoding files in DataLoader workers."""
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from dgkit.data import check_targets, discover, split_sources
    from dgkit.distill.students import Student, build_backbone

    data = discover(args.data)
    _, sources = check_targets(data, [args.target])
    train, _ = split_sources(data, sources, seed=0)
    transform = T.Compose([
        T.RandomResizedCrop(args.image_size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(0.1), T.ToTensor()])

    class Files(Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int):
            sample = data.samples[train[i]]
            return transform(Image.open(sample.path).convert("RGB")), sample.label

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = DataLoader(Files(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=min(8, os.cpu_count() or 1), pin_memory=True,
                        persistent_workers=True)
    backbone = build_backbone(student, "none")
    model = Student(backbone, torch.nn.Linear(backbone.feature_dim, len(data.classes)))
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = 0.0

    def batches():
        while True:
            yield from loader

    for done, (images, labels) in enumerate(batches()):
        if done == args.warmup:
            sync(device)
            start = time.perf_counter()
        if done == args.warmup + args.steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--target", default="sketch")
    parser.add_argument("--students", default="resnet50,efficientnet_lite0")
    parser.add_argument("--modes", default="plain,erm,kd-cached,kd-online",
                        help="plain, erm, kd-cached, kd-online; add +compile for torch.compile")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=0,
                        help="use only N images per domain and class (0: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dgkit-bench-"))
    if args.per_class:
        args.data = subset(args.data, args.per_class, work)
    modes = args.modes.split(",")
    teacher = random_teacher(work) if any(m.startswith("kd") for m in modes) else None
    rows = []
    for student in args.students.split(","):
        for mode in modes:
            ips = (time_plain(args, student) if mode == "plain"
                   else time_dgkit(args, student, mode, teacher, work))
            rows.append({"student": student, "mode": mode, "images_per_s": round(ips, 1)})
            print(f"{student:>20} {mode:>20} {ips:10.1f} img/s", flush=True)

    device = "cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda"
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "batch_size": args.batch_size,
        "image_size": args.image_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "data": str(args.data), "teacher": "open_clip ViT-B-16, random weights (speed only)",
        "rows": rows, "provenance": provenance(),
    }
    print(f"\n{'student':>20} {'mode':>20} {'img/s':>10} {'x erm':>7} {'x plain':>8}")
    for row in rows:
        base = {r["mode"]: r["images_per_s"] for r in rows if r["student"] == row["student"]}
        erm = base.get("erm+compile" if "+compile" in row["mode"] else "erm")
        vs_erm = f"{row['images_per_s'] / erm:.2f}" if erm else "-"
        vs_plain = f"{row['images_per_s'] / base['plain']:.2f}" if base.get("plain") else "-"
        print(f"{row['student']:>20} {row['mode']:>20} {row['images_per_s']:10.1f} "
              f"{vs_erm:>7} {vs_plain:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
