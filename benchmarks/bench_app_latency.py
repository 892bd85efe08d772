"""App latency and concurrency: upload -> heatmap, click -> description, and 20 clients at once.

Prints JSON lines. Usage:
  python benchmarks/bench_app_latency.py [--models demo/default] [--size 256] [--repeats 20] [--clients 20]

- "upload_to_heatmap": read the file, score, render the overlay with outlines (the /score handler).
- "click_to_description": region from the click + ranking the candidate captions (the click handler).
- "concurrency": the real Gradio server; N gradio_client sessions each upload their own image at the
  same time; each must get back its own image's score (no cross-user state), with no error.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectclip.data import MVTecDataset
from defectclip.pipeline import InspectionPipeline
from demo import handlers
from demo.models import EMBEDDED_DEFAULT

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"


def test_images(size: int, count: int) -> list[Path]:
    """Defective magnetic-tile test images resized to size x size, written to a temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="defectclip-bench-"))
    refs = [r for r in MVTecDataset(DATA, "test").refs if r.defect != "good"][:count]
    paths = []
    for index, ref in enumerate(refs):
        path = folder / f"{index:03d}.png"
        Image.open(ref.image_path).convert("RGB").resize((size, size)).save(path)
        paths.append(path)
    return paths


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * statistics.median(ordered), 1),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 1), "n": len(ordered)}


def bench_handlers(pipeline: InspectionPipeline, paths: list[Path], repeats: int) -> dict:
    model = pipeline.model_names[0]
    session = handlers.Session()
    handlers.score_upload(pipeline, session, str(paths[0]), model)  # warm-up
    upload, click = [], []
    for index in range(repeats):
        path = paths[index % len(paths)]
        start = time.perf_counter()
        handlers.score_upload(pipeline, session, str(path), model)
        upload.append(time.perf_counter() - start)
        y, x = np.unravel_index(np.argmax(session.result.anomaly_map), session.result.anomaly_map.shape)
        start = time.perf_counter()
        handlers.describe_point(pipeline, session, float(x), float(y))
        click.append(time.perf_counter() - start)
    return {"upload_to_heatmap": percentiles(upload), "click_to_description": percentiles(click)}


def bench_concurrency(pipeline: InspectionPipeline, paths: list[Path], clients: int) -> dict:
    from gradio_client import Client, handle_file

    from demo.app import build_demo

    model = pipeline.model_names[0]
    expected = [round(pipeline.score(np.asarray(Image.open(p).convert("RGB")), model).score, 4) for p in paths[:clients]]
    demo = build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    outcomes: list = [None] * clients

    def one_client(index: int) -> None:
        try:
            client = Client(url, verbose=False)
            _, score, _, _, _ = client.predict(handle_file(str(paths[index])), model, None, "", api_name="/score")
            outcomes[index] = ("ok", score)
        except Exception as err:  # the benchmark reports every failure instead of stopping at the first
            outcomes[index] = ("error", repr(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - start
    demo.close()
    errors = [o for o in outcomes if o is None or o[0] != "ok"]
    mixed_up = [i for i, o in enumerate(outcomes) if o and o[0] == "ok" and abs(o[1] - expected[i]) > 1e-3]
    return {"clients": clients, "errors": len(errors), "wrong_results": len(mixed_up), "wall_s": round(wall, 2),
            "error_examples": [e[1] for e in errors[:3] if e]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=EMBEDDED_DEFAULT, help="pipeline folder to load")
    parser.add_argument("--size", type=int, default=256, help="test image side in pixels")
    parser.add_argument("--repeats", type=int, default=20, help="timed requests per measurement")
    parser.add_argument("--clients", type=int, default=20, help="concurrent gradio_client sessions")
    args = parser.parse_args(argv)
    pipeline = InspectionPipeline.from_pretrained(args.models)
    paths = test_images(args.size, max(args.clients, 10))
    result = {"machine": machine(), "image_size": args.size, **bench_handlers(pipeline, paths, args.repeats)}
    print(json.dumps(result))
    if args.clients:
        print(json.dumps({"machine": machine(), "concurrency": bench_concurrency(pipeline, paths, args.clients)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
