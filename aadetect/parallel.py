"""CPU work shared out in whole pieces, each piece on one thread.

A piece (a block of KDE queries, a batch of images) runs with one intra-op thread, and
whole pieces go to a pool of as many threads as torch would use. So a piece's numbers do
not depend on how many threads the machine has, and no time goes to waking and waiting for
intra-op threads on small operations (see benchmarks/RESULTS.md, "Speed").
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import torch


class InlineExecutor(Executor):
    """Runs each piece at once, in the caller's thread: one thread, or a GPU that runs its own."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to whoever asks for the result, as a pool would
            future.set_exception(error)
        return future


@contextmanager
def piece_pool(device: Any) -> Iterator[tuple[Executor, int]]:
    """(executor, workers) for pieces of work on `device`.

    On the CPU with more than one torch thread: a pool of that many single-threaded workers,
    and the caller's own torch operations run on one thread meanwhile (restored on exit).
    Elsewhere: the pieces run inline, one at a time.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield InlineExecutor(), 1
        return
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool, threads
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a consumer that stops early leaves no work running
        torch.set_num_threads(threads)
