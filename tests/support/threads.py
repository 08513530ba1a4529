"""Run a function in threads at once (tests of concurrent requests)."""

import threading


def in_threads(fn, n: int, timeout: float = 180) -> list[BaseException]:
    """fn(0) .. fn(n - 1), each in its own thread, all joined; returns the exceptions they raised."""
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
