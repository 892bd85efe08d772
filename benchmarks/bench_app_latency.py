"""App latency, memory and concurrency: upload -> heatmap, click -> caption, 100 sessions in a row, 20 at once.

Prints JSON lines and writes benchmarks/results/app_latency.json. Usage:
  python benchmarks/bench_app_latency.py [--models demo/default] [--size 256] [--repeats 20]
                                         [--sessions 100] [--warmup 10] [--clients 20] [--threads 1]

- "upload_to_heatmap": read the file, score, render the overlay, enlarge, outline (the upload handler).
- "click_to_caption": region from the click + ranking the candidate captions (the click handler).
- "sessions": the real app (`python -c 'from demo.app import main; main()'`) in its own process; each session
  is a fresh gradio_client that uploads, clicks and describes all regions, then disconnects. The server's
  RSS is read after `--warmup` sessions and again after `--sessions` more: rss_growth_mb_100_sessions.
  Also counted: files in the app's cache, and any readable by other users.
- "concurrency": N clients upload their own image at the same time against that server; each must get its
  own image's score back ("leaks" counts results that belong to another client's image), with no error.
- "score_during_few_shot_build" (`--few-shot-refs 16`): one session scores uploads while another builds a
  few-shot bank from 16 train/good references, in a loop, on another thread; the scoring session's p95 must
  stay <= 2x its p95 alone (the build holds no pipeline-wide lock). Also: each build's wall time.
  `--only-few-shot` measures just this (and writes only it to --out).
Test images: defective magnetic_tile test images resized to size x size (the development data).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "magnetic_tile"
RESULTS = ROOT / "benchmarks" / "results" / "app_latency.json"
SERVER_START_S = 300


def machine(threads: int) -> str:
    cores = os.cpu_count()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU, {cores}-core CPU ({cpu_model()}), {threads} torch thread(s)"
    return f"{cores}-core CPU dev machine, {cpu_model()}, {threads} torch thread(s), no GPU"


def test_images(size: int, count: int) -> list[Path]:
    """Defective magnetic-tile test images resized to size x size, written to a temp folder."""
    from defectclip.data import MVTecDataset

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


# ------------------------------------------------------------------------------------------ handlers


def bench_handlers(pipeline, paths: list[Path], repeats: int) -> dict:
    from demo import handlers

    model = pipeline.model_names[0]
    session = handlers.Session()
    handlers.score_upload(pipeline, session, str(paths[0]), model)  # warm-up
    handlers.describe_point(pipeline, session, 1, 1)
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
    return {"upload_to_heatmap": percentiles(upload), "click_to_caption": percentiles(click)}


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def bench_score_during_build(pipeline, paths: list[Path], references: int, repeats: int) -> dict:
    """Another session's score latency alone and while 16-reference few-shot banks are being built."""
    from defectclip.data import MVTecDataset
    from demo import handlers

    refs = [str(r.image_path) for r in MVTecDataset(DATA, "train").refs[:references]]
    model = pipeline.model_names[0]
    scorer_session = handlers.Session()

    def timed_scores(count: int) -> list[float]:
        times = []
        for index in range(count):
            start = time.perf_counter()
            handlers.score_upload(pipeline, scorer_session, str(paths[index % len(paths)]), model)
            times.append(time.perf_counter() - start)
        return times

    timed_scores(2)  # warm-up
    builds: list[float] = []
    handlers.score_upload(pipeline, handlers.Session(), str(paths[0]), handlers.FEW_SHOT, refs[:2])  # builds the tower
    alone = timed_scores(repeats)
    stop = threading.Event()

    def build_loop():
        while not stop.is_set():
            start = time.perf_counter()
            handlers.score_upload(pipeline, handlers.Session(), str(paths[0]), handlers.FEW_SHOT, refs)
            builds.append(time.perf_counter() - start)

    builder = threading.Thread(target=build_loop, daemon=True)
    builder.start()
    time.sleep(0.5)  # the build is under way before the first timed score
    during = timed_scores(repeats)
    stop.set()
    builder.join()
    ratio = p95(during) / p95(alone)
    return {"references": references, "score_alone": percentiles(alone) | {"p95_ms": round(1000 * p95(alone), 1)},
            "score_during_build": percentiles(during) | {"p95_ms": round(1000 * p95(during), 1)},
            "p95_ratio": round(ratio, 2), "target_met": ratio <= 2.0,
            "build_upload_to_result_s": [round(b, 2) for b in builds]}


# ---------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models: Path, threads: int, cache: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, DEFECTCLIP_MODELS=str(models), GRADIO_SERVER_PORT=str(port), GRADIO_TEMP_DIR=str(cache),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GRADIO_ANALYTICS_ENABLED="False")
    log = open(cache.parent / "server.log", "w")  # noqa: SIM115  (closed with the process)
    server = subprocess.Popen([sys.executable, "-c", "from demo.app import main; main()"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + SERVER_START_S
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited; see {cache.parent / 'server.log'}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the app did not start in time")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_session(url: str, path: Path, model: str) -> float:
    """A user: upload, click the hottest spot, describe all regions, leave. Returns the score shown."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    try:
        outputs = client.predict(handle_file(str(path)), model, None, "", api_name="/score")
        client.predict(10, 10, api_name="/describe_point")
        client.predict(api_name="/describe_all")
        return float(outputs[2])
    finally:
        client.close()


def cache_report(cache: Path) -> dict:
    files = [Path(root) / name for root, _, names in os.walk(cache) for name in names]
    open_to_others = [f for f in files if stat.S_IMODE(f.stat().st_mode) & 0o077]
    reachable = stat.S_IMODE(cache.stat().st_mode) & 0o077 != 0
    return {"cache_files": len(files), "cache_dir_mode": oct(stat.S_IMODE(cache.stat().st_mode)),
            "files_readable_by_others": len(open_to_others) if reachable else 0}


def bench_sessions(url: str, pid: int, paths: list[Path], model: str, warmup: int, sessions: int,
                   cache: Path) -> dict:
    for index in range(warmup):
        one_session(url, paths[index % len(paths)], model)
    time.sleep(1)
    before = rss_mb(pid)
    samples = []
    start = time.perf_counter()
    for index in range(sessions):
        one_session(url, paths[index % len(paths)], model)
        if (index + 1) % 10 == 0:
            samples.append(round(rss_mb(pid) - before, 1))
    wall = time.perf_counter() - start
    time.sleep(1)
    after = rss_mb(pid)
    return {"warmup_sessions": warmup, "sessions": sessions, "rss_after_warmup_mb": round(before, 1),
            "rss_after_mb": round(after, 1), "rss_growth_mb_100_sessions": round((after - before) * 100 / sessions, 1),
            "rss_growth_every_10_sessions_mb": samples, "wall_s": round(wall, 1), **cache_report(cache)}


def bench_concurrency(url: str, paths: list[Path], model: str, expected: list[str], clients: int) -> dict:
    from gradio_client import Client, handle_file

    outcomes: list = [None] * clients

    def one_client(index: int) -> None:
        try:
            client = Client(url, verbose=False)
            outputs = client.predict(handle_file(str(paths[index])), model, None, "", api_name="/score")
            outcomes[index] = ("ok", outputs[2], outputs[4])
            client.close()
        except Exception as err:  # the benchmark reports every failure instead of stopping at the first
            outcomes[index] = ("error", repr(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - start
    errors = [o for o in outcomes if o is None or o[0] != "ok"]
    leaks = [i for i, o in enumerate(outcomes) if o and o[0] == "ok" and o[1] != expected[i]]
    return {"clients": clients, "errors": len(errors), "leaks": len(leaks), "wall_s": round(wall, 2),
            "error_examples": [e[1] for e in errors[:3] if e]}


def main(argv=None) -> int:
    from defectclip.pipeline import InspectionPipeline
    from demo.models import EMBEDDED_DEFAULT
    from demo.render import number_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=EMBEDDED_DEFAULT, help="pipeline folder to load")
    parser.add_argument("--size", type=int, default=256, help="test image side in pixels")
    parser.add_argument("--repeats", type=int, default=20, help="timed requests per latency measurement")
    parser.add_argument("--sessions", type=int, default=100, help="sessions in a row for the memory measurement")
    parser.add_argument("--warmup", type=int, default=10, help="sessions before the first RSS reading")
    parser.add_argument("--clients", type=int, default=20, help="concurrent gradio_client sessions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (here and in the server)")
    parser.add_argument("--device", default="auto", help="where the models run: auto (CUDA when present), cpu, cuda")
    parser.add_argument("--few-shot-refs", type=int, default=16, help="references per few-shot build (0: skip)")
    parser.add_argument("--only-few-shot", action="store_true", help="measure only score_during_few_shot_build")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    pipeline = InspectionPipeline.from_pretrained(args.models).to(device)
    model = pipeline.model_names[0]
    paths = test_images(args.size, max(args.clients, 10))
    shown_models = args.models.resolve()
    shown_models = shown_models.relative_to(ROOT) if shown_models.is_relative_to(ROOT) else shown_models
    results = {"machine": machine(args.threads), "device": device, "models": str(shown_models), "model": model,
               "image_size": args.size, "data": "magnetic_tile test defects (subset, resized)"}
    if args.few_shot_refs:
        results["score_during_few_shot_build"] = bench_score_during_build(pipeline, paths, args.few_shot_refs,
                                                                          args.repeats)
        print(json.dumps({"score_during_few_shot_build": results["score_during_few_shot_build"]}), flush=True)
    if not args.only_few_shot:
        results.update(bench_handlers(pipeline, paths, args.repeats))
        print(json.dumps({k: results[k] for k in ("machine", "upload_to_heatmap", "click_to_caption")}), flush=True)

    if (args.sessions or args.clients) and not args.only_few_shot:
        expected = [number_text(pipeline.score(np.asarray(Image.open(p).convert("RGB")), model).score) for p in paths]
        cache = Path(tempfile.mkdtemp(prefix="defectclip-bench-app-")) / "cache"
        server, url = start_server(args.models, args.threads, cache)
        try:
            if args.sessions:
                results["sessions"] = bench_sessions(url, server.pid, paths, model, args.warmup, args.sessions, cache)
                results["rss_growth_mb_100_sessions"] = results["sessions"]["rss_growth_mb_100_sessions"]
                print(json.dumps({"sessions": results["sessions"]}), flush=True)
            if args.clients:
                results["concurrency"] = bench_concurrency(url, paths, model, expected, args.clients)
                print(json.dumps({"concurrency": results["concurrency"]}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)  # atomic: a killed run never leaves half a results file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
