"""Progress lines on stderr: what runs, how far, how long it took, how long it may still take."""
import contextlib
import sys
import threading
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _clock(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


class Progress:
    """Progress of ``total`` steps on stderr: "[label k/n] what (elapsed, about … left)" as each step
    starts (the estimate: the mean of the steps done so far), and a heartbeat every ``beat_s`` seconds
    while one runs, so that a step of minutes (a fused-linear case, the ahead-of-time compilation) is
    never silent."""

    def __init__(self, label, total, beat_s=30.0):
        self.label, self.total, self.beat_s = label, total, beat_s
        self.done, self.t0 = 0, time.perf_counter()

    @contextlib.contextmanager
    def step(self, what):
        k, elapsed = self.done + 1, time.perf_counter() - self.t0
        left = f", about {_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        log(f"[{self.label} {k}/{self.total}] {what} (elapsed {_clock(elapsed)}{left})")
        stop, t_step = threading.Event(), time.perf_counter()

        def beat():
            while not stop.wait(self.beat_s):
                log(f"    ... {self.label} {k}/{self.total} still running: {_clock(time.perf_counter() - t_step)} "
                    f"in this step, {_clock(time.perf_counter() - self.t0)} in all")
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.done += 1
