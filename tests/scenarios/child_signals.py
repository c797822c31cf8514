"""Children forked by a tool take SIGTERM whatever they are blocked in (tests/test_reliability_interrupt.py).

    python -m tests.scenarios.child_signals

Inside `interrupt.stop_on_signals`, a forked child blocks its main thread on a lock the parent holds,
as an idle pool worker does, with SIGTERM masked there so that the kernel hands the signal to the
child's other thread, as it may whenever a child has threads. Prints the child's exit code after
SIGTERM (None: still alive after 20 s), then the name of the SIGTERM handler of a child forked after the
block.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time


def blocked(lock, ready) -> None:
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready.set()
    lock.acquire()  # in C (sem_wait) until the parent releases it, which it never does


def handler(queue) -> None:
    queue.put(getattr(signal.getsignal(signal.SIGTERM), "__name__", None))


def the_process_own(signum, frame) -> None:
    """The SIGTERM handler the process had before the tool's block."""


def main() -> None:
    from wit_megatron import interrupt

    ctx = multiprocessing.get_context("fork")
    lock, ready = ctx.Lock(), ctx.Event()
    lock.acquire()
    signal.signal(signal.SIGTERM, the_process_own)
    with interrupt.stop_on_signals("nothing"):
        child = ctx.Process(target=blocked, args=(lock, ready))
        child.start()
        ready.wait(20)
        time.sleep(0.2)  # into sem_wait
        os.kill(child.pid, signal.SIGTERM)
        child.join(20)
        print(child.exitcode)
        if child.exitcode is None:
            child.kill()
    queue = ctx.SimpleQueue()
    after = ctx.Process(target=handler, args=(queue,))
    after.start()
    print(queue.get())
    after.join()


if __name__ == "__main__":
    main()
