"""What shard verification costs a training start: hash a multi-GB directory of synthetic uint16
shards cold (its pages dropped from the page cache with posix_fadvise, so only these files are
affected), warm, with 1 thread and with all, then the remembered re-run; beside it, building the
gpt2 (124M) model, the work it runs in parallel with.

    python benchmarks/bench_verify.py --gib 3 [--dir /tmp/gptforge-bench-verify] [--keep]

Writes the shards once (deleted at the end unless --keep). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def drop_cache(data_dir: Path) -> None:
    for p in data_dir.iterdir():
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=3.0, help="size of the shard directory")
    ap.add_argument("--shard-mib", type=int, default=200, help="size of one shard (prepare's default: 200 MB)")
    ap.add_argument("--dir", default="", help="where to write the shards (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    from gptforge import fsutil
    from gptforge.data import shards
    from gptforge.data.prepare import default_workers
    from gptforge.data.verify import cache_path, verify_shards
    from gptforge.model import GPT, preset

    data = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="gptforge-bench-verify-"))
    cache = Path(tempfile.mkdtemp(prefix="gptforge-bench-cache-"))
    os.environ["GPTFORGE_CACHE"] = str(cache)
    per = a.shard_mib * 2**20 // 2
    n = max(1, round(a.gib * 2**30 / (per * 2)))
    rng = np.random.default_rng(0)
    try:
        if not (data / shards.MANIFEST).exists():
            t0 = time.perf_counter()
            arrays = (rng.integers(0, 50257, per, dtype=np.uint16) for _ in range(n))
            shards.write_dataset(data, {"val": [rng.integers(0, 50257, 1 << 20, dtype=np.uint16)], "train": arrays},
                                 vocab_size=50257, eot_id=50256, tokenizer="gpt2")
            print(f"wrote {n} shards of {a.shard_mib} MiB in {time.perf_counter() - t0:.1f} s")
        size = sum(p.stat().st_size for p in data.iterdir())
        print(f"{data}: {size / 2**30:.2f} GiB; {default_workers()} cores")

        def run(label: str, cold: bool, **kw) -> None:
            cache_path(data).unlink(missing_ok=True)
            fsutil._DIGESTS.clear()  # this process's memo of digests, too
            if cold:
                drop_cache(data)
            r = verify_shards(data, progress=False, **kw)
            print(f"| {label} | {r['seconds']:.2f} | {r['bytes_hashed'] / 2**30 / r['seconds']:.2f} |")

        print("| verification | s | GiB/s |\n|---|---|---|")
        run("first run, cold page cache, all cores", True)
        run("first run, cold page cache, 1 thread", True, workers=1)
        run("first run, warm page cache, all cores", False)
        run("first run, warm page cache, 1 thread", False, workers=1)
        verify_shards(data, progress=False)
        t0 = time.perf_counter()
        r = verify_shards(data, progress=False)
        assert r["hashed"] == 0
        print(f"| re-run (remembered, nothing hashed) | {time.perf_counter() - t0:.3f} | |")
        t0 = time.perf_counter()
        GPT(preset("gpt2"))
        print(f"| for scale: building the gpt2 (124M) model on the CPU | {time.perf_counter() - t0:.2f} | |")

        # what a restart feels: the trainer's whole start (loaders, model, optimizer), the hashing
        # running in the background meanwhile
        from gptforge import config as C
        from gptforge.training.trainer import Trainer

        def start(verify: str, cold: bool) -> float:
            fsutil._DIGESTS.clear()
            if cold:
                cache_path(data).unlink(missing_ok=True)
                drop_cache(data)
            over = {"model.preset": "gpt2", "data.dir": str(data), "data.verify": verify, "data.prefetch": "0",
                    "run.device": "cpu", "run.precision": "fp32", "run.dir": str(cache / "run"), "run.peak_tflops": "1",
                    "optim.batch_tokens": "4096", "optim.micro_batch_size": "4"}
            t0 = time.perf_counter()
            t = Trainer(C.resolve(None, list(over.items())), progress=False)
            dt = time.perf_counter() - t0
            t.loader.close()
            t.val_loader.close()
            return dt

        start("off", False)  # warm-up: first-time imports and allocations
        print("\n| `Trainer(cfg)` start, gpt2 (124M), this directory | s |\n|---|---|")
        print(f"| --data.verify off | {start('off', True):.2f} |")
        print(f"| --data.verify on, first run (cold page cache) | {start('on', True):.2f} |")
        print(f"| --data.verify on, restart (remembered) | {start('on', False):.2f} |")
        print(f"| --data.verify off, again | {start('off', True):.2f} |")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
