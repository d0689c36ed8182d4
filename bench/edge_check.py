"""Edge check: `dgkit predict` and `dgkit serve` against `dgkit validate` on the same images.

Meant for a fresh virtual environment with only the edge install (`pip install '.[serve]'`, no
torch): classifies every image of one domain folder with `dgkit predict --format csv` and with
a real `dgkit serve` on localhost (32 images per request), computes each one's accuracy from the
class folder names, and compares both with the accuracy `dgkit validate` stored for that model
in the run's export/report.json. Prints a table and writes JSON.

    python bench/edge_check.py runs/pacs-sketch/export/model.int8.onnx \\
        ../shared/datasets/PACS/sketch --json bench/results/edge_check.json
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dgkit.preprocess import IMAGE_SUFFIXES
from dgkit.serve.bench import multipart_body, running_server

# The commands run outside the repository: there, `python -m dgkit` would import the source
# folder dgkit/ rather than the installed package this check is about.
OUTSIDE = tempfile.gettempdir()


def domain_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, class folder name) for every image under folder/<class>/."""
    return sorted((path, path.relative_to(folder).parts[0]) for path in folder.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES)


def predict_accuracy(model: Path, folder: Path, truth: dict[str, str]) -> tuple[float, int]:
    """Accuracy of `dgkit predict MODEL FOLDER --format csv`, and the images it classified."""
    out = subprocess.run([sys.executable, "-m", "dgkit", "predict", str(model), str(folder),
                          "--format", "csv", "--top-k", "1"], capture_output=True, text=True,
                         check=True, cwd=OUTSIDE).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    label_key = next(k for k in rows[0] if k.startswith("label"))
    right = sum(truth[str(Path(row["path"]).resolve())] == row[label_key] for row in rows)
    return 100 * right / len(rows), len(rows)


def serve_accuracy(model: Path, images: list[tuple[Path, str]], batch: int = 32
                   ) -> tuple[float, int]:
    """Accuracy of a local `dgkit serve MODEL` over HTTP, `batch` images per request."""
    with running_server(model) as base:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
        right = 0
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            body, content_type = multipart_body([(p.name, p.read_bytes()) for p, _ in chunk])
            conn.request("POST", "/predict?top_k=1", body, {"Content-Type": content_type})
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            right += sum(r["label"] == label
                         for r, (_, label) in zip(answer["predictions"], chunk, strict=True))
        conn.close()
    return 100 * right / len(images), len(images)


def validate_accuracy(model: Path, domain: str) -> float | None:
    """The target accuracy `dgkit validate` stored for this model file, if any."""
    report = model.parent / "report.json"
    if not report.exists():
        return None
    for artifact in json.loads(report.read_text())["artifacts"]:
        if artifact["file"] == model.name:
            return artifact["accuracy"].get(domain)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("domain", type=Path, help="a domain folder: DOMAIN/<class>/<image>")
    parser.add_argument("--json", type=Path, dest="json_out")
    args = parser.parse_args()

    args.model, args.domain = args.model.resolve(), args.domain.resolve()
    images = domain_images(args.domain)
    truth = {str(p.resolve()): label for p, label in images}
    try:
        import torch  # noqa: F401
        torch_present = True
    except ImportError:
        torch_present = False
    predict_acc, n_predict = predict_accuracy(args.model, args.domain, truth)
    serve_acc, n_serve = serve_accuracy(args.model, images)
    validate_acc = validate_accuracy(args.model, args.domain.name)
    result = {"model": str(args.model), "domain": args.domain.name, "images": len(images),
              "torch_installed": torch_present,
              "predict": {"accuracy": round(predict_acc, 2), "images": n_predict},
              "serve": {"accuracy": round(serve_acc, 2), "images": n_serve},
              "validate": {"accuracy": validate_acc}}
    print(f"{'path':<10}{'images':>8}{'accuracy %':>12}")
    print(f"{'predict':<10}{n_predict:>8}{predict_acc:>12.2f}")
    print(f"{'serve':<10}{n_serve:>8}{serve_acc:>12.2f}")
    shown = "—" if validate_acc is None else f"{validate_acc:.2f}"
    print(f"{'validate':<10}{len(images):>8}{shown:>12}   (export/report.json)")
    print(f"torch installed: {torch_present}")
    if args.json_out:
        from dgkit.provenance import provenance

        result["provenance"] = provenance()
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
