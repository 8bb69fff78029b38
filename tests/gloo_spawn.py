"""Run a function in N spawned processes with a hard deadline (tests must never hang).

Workers write ``error.<rank>.txt`` into ``outdir`` when they fail; those texts become the assertion
message. Processes still alive at the end are killed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch.multiprocessing as mp


def spawn_and_wait(fn: Callable, args: tuple, nprocs: int, outdir: Path, deadline_s: float, what: str) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} gloo workers did not finish within {deadline_s} s")
    except Exception as exc:
        errors = "\n".join(p.read_text() for p in sorted(Path(outdir).glob("error.*.txt")))
        raise AssertionError(f"{what} workers failed:\n{errors}") from exc
    finally:
        for p in ctx.processes:  # only the processes this call started
            if p.is_alive():
                p.kill()
                p.join(5)
