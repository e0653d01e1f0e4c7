"""S3 transfer speed: the store's parallel transfers vs single-stream s3fs, same files, same server.

    .venv/bin/python bench/s3_transfer.py [--files 4] [--mb 64] [--rounds 3] [--json FILE]

Starts a moto S3 server (its own process) on 127.0.0.1, writes `--files` checkpoint-like shards
of `--mb` MB random bytes, and times, in alternating order within each round:

- single: s3fs with default settings, one file at a time (`fs.put_file`, then `fs.get_file`);
- store: what `Store.write_dir` and `Store.fetch` move files with (`btx_core.store.transfer`'s
  `put_files`/`get_files` with the `Store.transfer` defaults: several files at once, each file
  of two parts or more in parallel parts: multipart upload, ranged download);
- store+hash: `Store.write_dir` and `Store.fetch` themselves (also sha256 of every file, the size
  listing, the manifest; fetch checks every hash), for what a stage really pays.

Reports medians over rounds and the single / store ratio of the medians. Every download is
checked byte for byte against its source.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SIDES = ("single", "store", "store+hash")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start within 60 s")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="shard files per transfer")
    parser.add_argument("--mb", type=int, default=64, help="size of each shard, MB (10^6 bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the raw measurements here")
    args = parser.parse_args()

    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    import boto3
    import fsspec

    from btx_core.store.core import Store
    from btx_core.store.transfer import get_files, put_files

    load = os.getloadavg()[0]
    server = start_moto(port)
    try:
        boto3.client("s3").create_bucket(Bucket="btx-bench")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)  # s3fs defaults
        store = Store("s3://btx-bench/store", storage_options={"skip_instance_cache": True})
        with tempfile.TemporaryDirectory(prefix="btx-s3bench-") as tmp:
            src = Path(tmp, "src")
            src.mkdir()
            names = [f"model-{i + 1:05d}-of-{args.files:05d}.safetensors" for i in range(args.files)]
            for name in names:
                (src / name).write_bytes(os.urandom(args.mb * 10**6))
            total = args.files * args.mb * 10**6

            def check(dest: Path) -> None:
                for name in names:
                    if (dest / name).read_bytes() != (src / name).read_bytes():
                        raise RuntimeError(f"{dest / name} differs from its source")

            def run(side: str, r: int) -> tuple[float, float]:
                dest = Path(tmp, f"{side}-{r}")
                dest.mkdir()
                remote = f"btx-bench/{side}-{r}"
                pairs_up = [(str(src / n), f"{remote}/{n}") for n in names]
                pairs_down = [(f"{remote}/{n}", str(dest / n)) for n in names]
                if side == "single":
                    up = timed(lambda: [fs.put_file(a, b) for a, b in pairs_up])
                    down = timed(lambda: [fs.get_file(a, b) for a, b in pairs_down])
                elif side == "store":
                    up = timed(lambda: put_files(store.fs, pairs_up, store.transfer))
                    sizes = [args.mb * 10**6] * len(names)  # fetch takes them from the manifest
                    down = timed(lambda: get_files(store.fs, pairs_down, sizes, store.transfer))
                else:
                    location = store.child(f"hash-{r}")
                    up = timed(lambda: store.write_dir(src, location, stage="bench", config_hash="x"))
                    got = []
                    down = timed(lambda: got.append(store.fetch(location, dest)))
                    dest = got[0]
                check(dest)
                fs.rm(remote if side != "store+hash" else store._path(location), recursive=True)
                for path in Path(tmp, f"{side}-{r}").rglob("*"):
                    if path.is_file():
                        path.unlink()  # keep the scratch disk small
                return up, down

            run("single", -1), run("store", -1)  # warm-up: connections, imports, moto's first bucket use
            results: dict[str, dict[str, list[float]]] = {s: {"up": [], "down": []} for s in SIDES}
            for r in range(args.rounds):
                order = SIDES if r % 2 == 0 else SIDES[::-1]
                for side in order:
                    up, down = run(side, r)
                    results[side]["up"].append(up)
                    results[side]["down"].append(down)
                    print(f"round {r + 1} {side:>10}: up {up:6.2f} s ({total / up / 1e6:6.1f} MB/s)  "
                          f"down {down:6.2f} s ({total / down / 1e6:6.1f} MB/s)", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    med = {s: {d: statistics.median(v) for d, v in results[s].items()} for s in SIDES}
    print(f"\n{args.files} x {args.mb} MB, {args.rounds} rounds, {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load {load:.1f} at start\n")
    print("| side | upload s | upload MB/s | download s | download MB/s | per-round up s | per-round down s |")
    print("|---|---:|---:|---:|---:|---|---|")
    for s in SIDES:
        m = med[s]
        print(f"| {s} | {m['up']:.2f} | {total / m['up'] / 1e6:.0f} | {m['down']:.2f} | "
              f"{total / m['down'] / 1e6:.0f} | {', '.join(f'{x:.2f}' for x in results[s]['up'])} | "
              f"{', '.join(f'{x:.2f}' for x in results[s]['down'])} |")
    for s in SIDES[1:]:
        print(f"\nsingle / {s}: upload {med['single']['up'] / med[s]['up']:.2f}x, download "
              f"{med['single']['down'] / med[s]['down']:.2f}x, both "
              f"{sum(med['single'].values()) / sum(med[s].values()):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
