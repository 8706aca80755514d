"""Driver of the multiprocessing tests: ``python -m apps.process.mp_main METHOD MODE``.

METHOD is a start method (fork, spawn, forkserver); MODE is one of
``process`` (two Process children, started and joined), ``pool`` (a Pool of 2, ``map``,
then ``close`` and ``join``), ``pool-terminate`` (tasks flush themselves, then the pool is
left through ``with Pool(...)``, which terminates it). The parent tracks events before and
after its children; it prints the children's pids, one per line, and exits normally.
"""

from __future__ import annotations

import multiprocessing
import sys

from apps.process import mp_jobs


def main(method: str, mode: str) -> None:
    ctx = multiprocessing.get_context(method)
    mp_jobs.produce("parent", 3)  # the parent's thread is running when the children start
    pids = []
    if mode == "process":
        children = [ctx.Process(target=mp_jobs.process_job, args=(7,)) for _ in range(2)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            assert child.exitcode == 0, child.exitcode
            pids.append(child.pid)
    elif mode == "pool":
        pool = ctx.Pool(2)
        pids = pool.map(mp_jobs.pool_job, [5] * 8, chunksize=1)
        pool.close()
        pool.join()
    elif mode == "pool-terminate":
        with ctx.Pool(2) as pool:
            pids = pool.map(mp_jobs.pool_job_flushed, [5] * 8, chunksize=1)
    else:
        raise SystemExit(f"unknown mode {mode}")
    mp_jobs.produce("parent", 3)
    for pid in sorted(set(pids)):
        print(pid)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
