"""Open Inference Protocol v2 on a real `dgkit serve`, spoken to by Triton's own HTTP client
(tritonclient, which no one here wrote) and by httpx for the malformed requests a client library
would not send. Answers are checked against the model's numpy twin and against Predictor."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PACS
from serve_helpers import CLASSES, encode, huge_png, make_model, needs_serve_extra, photo
from serve_helpers import reference_logits as numpy_logits
from test_serve_http import Server, start

from dgkit.preprocess import to_model_input
from dgkit.serve import Predictor

pytestmark = needs_serve_extra
httpx = pytest.importorskip("httpx", reason="needs httpx (the 'dev' extra)")
triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the 'dev' "
                                                         "extra)")

NAME = "tiny-v2"  # --model-name


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("model") / "tiny.fp32.onnx"
    return path, make_model(path)


@pytest.fixture(scope="module")
def running(model: tuple[Path, dict[str, np.ndarray]]) -> Iterator[Server]:
    server = start([str(model[0]), "--max-request-mb", "2", "--backend", "ort-cpu",
                    "--model-name", NAME])
    yield server
    code, output = server.stop()
    assert code == 0, output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def client(running: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(running.url.removeprefix("http://"))


def images() -> list[bytes]:
    return [encode(photo(s)) for s in (0, 3)] + [encode(photo(8, 90, 40), "JPEG")]


def fp32_input(batch: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def bytes_input(files: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))  # binary: images are not text
    return tensor


def top(k: int) -> list[triton.InferRequestedOutput]:
    """The classification extension: the top k as "value:index:label"."""
    return [triton.InferRequestedOutput("logits", class_count=k)]


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("FP32", [-1, 3, 32, 32]), "image_bytes": ("BYTES", [-1])}
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32",
                                "shape": [-1, len(CLASSES)]}]
    with pytest.raises(triton.InferenceServerException, match="no model 'other'"):
        client.get_model_metadata("other")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32_and_bytes_equal_the_predictor(
        client: triton.InferenceServerClient, model: tuple[Path, dict[str, np.ndarray]],
        binary: bool) -> None:
    path, weights = model
    files = images()
    predictor = Predictor(path, "ort-cpu")
    batch = to_model_input(np.stack([predictor.prepare(f) for f in files]))
    want = numpy_logits(batch, weights)  # the graph recomputed in float64 numpy
    expected = predictor.predict(files, top_k=3)
    assert len({p.label for p in expected}) > 1  # else one class for all would pass

    logits = [triton.InferRequestedOutput("logits", binary_data=binary)]
    for given in (fp32_input(batch, binary), bytes_input(files)):
        result = client.infer(NAME, [given], outputs=logits)
        np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)
        ranked = client.infer(NAME, [given], outputs=top(3)).as_numpy("logits")
        assert ranked.shape == (len(files), 3)
        for row, pred, values in zip(ranked, expected, want, strict=True):
            fields = [e.decode().split(":") for e in row]
            assert [label for _, _, label in fields] == list(pred.labels)
            assert [int(i) for _, i, _ in fields] == list(pred.indices)
            np.testing.assert_allclose([float(v) for v, _, _ in fields],
                                       values[list(pred.indices)], rtol=1e-4, atol=1e-4)


def test_default_outputs_and_request_id(client: triton.InferenceServerClient) -> None:
    """No outputs named: the client asks for binary ones and must still read the answer."""
    result = client.infer(NAME, [bytes_input(images()[:1])], request_id="r-7")
    assert result.as_numpy("logits").shape == (1, len(CLASSES))
    assert result.get_response()["id"] == "r-7"


@pytest.mark.pacs
def test_pacs_images_get_the_predictors_top1(client: triton.InferenceServerClient,
                                             model: tuple[Path, dict[str, np.ndarray]]) -> None:
    paths = [sorted((PACS / domain / "dog").iterdir())[0]
             for domain in ("art_painting", "cartoon", "photo", "sketch")]
    files = [p.read_bytes() for p in paths]
    want = [p.label for p in Predictor(model[0], "ort-cpu").predict(paths)]
    result = client.infer(NAME, [bytes_input(files)], outputs=top(1))
    got = [row[0].decode().split(":")[2] for row in result.as_numpy("logits")]
    assert got == want


def post(server: str, body: bytes | dict, headers: dict[str, str] | None = None,
         model: str = NAME) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{server}/v2/models/{model}/infer", content=content, headers=headers)


def b64_request(files: list[bytes]) -> dict:
    return {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
                        "data": [base64.b64encode(f).decode() for f in files]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}


def test_json_bytes_input_takes_base64(running: Server,
                                       model: tuple[Path, dict[str, np.ndarray]]) -> None:
    files = images()
    r = post(running.url, b64_request(files))
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    want = Predictor(model[0], "ort-cpu").predict(files, top_k=2)
    assert out["shape"] == [3, 2] and out["datatype"] == "BYTES"
    assert [e.split(":")[2] for e in out["data"]] == [lab for p in want for lab in p.labels]


FP32 = {"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * 3072}


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"{not json", 400, "not JSON"),
    ({"inputs": []}, 400, "exactly one input"),
    ({"inputs": [{**FP32, "name": "pixels"}]}, 400, "unknown input 'pixels'"),
    ({"inputs": [{**FP32, "shape": [1, 3, 64, 64]}]}, 400, "must be FP32 [N, 3, 32, 32]"),
    ({"inputs": [{**FP32, "data": [0.5] * 100}]}, 400, "has 100 values"),
    ({"inputs": [{**FP32, "data": ["a"] * 3072}]}, 400, "not a list of numbers"),
    ({"inputs": [{**FP32, "datatype": "INT8"}]}, 400, "must be FP32"),
    ({"inputs": [FP32], "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
    ({"inputs": [FP32], "outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
     400, "classification must be a positive integer"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]},
     400, "not base64"),
    (b64_request([b"hello, I am text"]), 400, "image_bytes[0] cannot be decoded: not an image"),
])
def test_malformed_requests_are_400_with_the_reason(running: Server, body: bytes | dict,
                                                    status: int, reason: str) -> None:
    r = post(running.url, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


def test_limits_and_media_errors(running: Server, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    huge_png(huge)  # 20000 x 20000 in ~50 KB: over the pixel limit, not the byte limit
    r = post(running.url, b64_request([huge.read_bytes()]))
    assert r.status_code == 413 and "image_bytes[0] is too large" in r.json()["error"]
    r = post(running.url, b"x" * (3 * 2**20))
    assert r.status_code == 413 and "2 MB" in r.json()["error"]
    r = post(running.url, gzip.compress(json.dumps({"inputs": [FP32]}).encode()),
             {"content-encoding": "gzip"})
    assert r.status_code == 415 and "gzip" in r.json()["error"]
    r = httpx.post(f"{running.url}/predict", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = post(running.url, {"inputs": [FP32]}, model="other")
    assert r.status_code == 404 and "no model 'other'" in r.json()["error"]
    assert httpx.get(f"{running.url}/v2/health/live").json() == {"live": True}


def scrape(server: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics parsed with prometheus_client's own parser: (sample, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_concurrent_requests_share_a_batch_and_a_bad_image_fails_alone(
        model: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Three good images from three clients (/predict, v2 BYTES, v2 FP32) and a bad one: the
    good ones run as one model call of 3 (--max-batch 3 closes it as soon as they are in, the
    long delay makes sure they wait for each other) and each gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    path, weights = model
    server = start([str(path), "--backend", "ort-cpu", "--max-batch", "3",
                    "--max-delay-ms", "5000", "--model-name", NAME])
    try:
        files = images()
        predictor = Predictor(path, "ort-cpu")
        want = numpy_logits(to_model_input(np.stack([predictor.prepare(f) for f in files])),
                            weights)
        labels = [CLASSES[i] for i in want.argmax(1)]
        fp32 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32],
                            "data": to_model_input(predictor.prepare(files[2])[None])
                            .ravel().tolist()}]}
        asks = [lambda: httpx.post(f"{server.url}/predict", files={"file": ("a.png", files[0])},
                                   timeout=30),
                lambda: post(server.url, b64_request(files[1:2])),
                lambda: post(server.url, fp32),
                lambda: post(server.url, b64_request([b"not an image"]))]
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = [f.result() for f in [pool.submit(ask) for ask in asks]]
        assert [a.status_code for a in answers] == [200, 200, 200, 400], [a.text for a in answers]
        assert answers[0].json()["predictions"][0]["label"] == labels[0]
        assert answers[1].json()["outputs"][0]["data"][0].split(":")[2] == labels[1]
        np.testing.assert_allclose(answers[2].json()["outputs"][0]["data"], want[2],
                                   rtol=1e-4, atol=1e-4)

        m = scrape(server.url)
        assert m[("dgkit_batch_size_count", ())] == 1 and m[("dgkit_batch_size_sum", ())] == 3
        assert m[("dgkit_inference_seconds_count", ())] == 1
        assert m[("dgkit_queue_seconds_count", ())] == 3
        # Decoded: /predict and BYTES; the FP32 tensor came preprocessed, the bad image failed.
        assert m[("dgkit_preprocess_seconds_count", ())] == 2
        infer = "/v2/models/{model_name}/infer"
        requests = {k[1]: v for k, v in m.items() if k[0] == "dgkit_requests_total"}
        assert requests == {(("endpoint", "/predict"), ("status", "200")): 1,
                            (("endpoint", infer), ("status", "200")): 2,
                            (("endpoint", infer), ("status", "400")): 1}
        assert m[("dgkit_request_seconds_count", (("endpoint", infer),))] == 3
    finally:
        code, output = server.stop()
    assert code == 0 and "Traceback" not in output, output


def test_docs_work_offline_and_document_the_upload_field(running: Server) -> None:
    schema = httpx.get(f"{running.url}/openapi.json").json()
    form = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["required"] == ["file"]
    assert form["schema"]["properties"]["file"]["items"]["format"] == "binary"
    page = httpx.get(f"{running.url}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "POST /predict" in page.text and "multipart/form-data" in page.text
    assert "POST /v2/models/{model_name}/infer" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing to fetch
