"""Load test of BLIP-2 Studio: N concurrent gradio_client users against the app on the embedded model.

    python -m bench.load_test                          # 32 users x 20 requests, bounded by --timeout-s
    python -m bench.load_test --users 4 --requests 8 --timeout-s 120

Starts `python app.py --host 127.0.0.1 --port P` as a subprocess (loopback only; env BLIP2_QUEUE_SIZE =
2 x users, other limits at their defaults), waits until it answers, sends one warm-up request per endpoint,
measures the server's resident memory (psutil, the process and its children), then runs --users threads,
each with its own Client, each sending --requests requests that cycle over /caption (short max_new_tokens),
/chat, /match (a few texts) and /search (a gallery of 4 example images). Latency is per request, from
submit to the final (streamed) result, queue waiting included. The server's resident memory is measured
again at the end. The server is always terminated (also on Ctrl-C and errors), and the whole run is bounded
by --timeout-s: requests not answered by then count as failed.

Targets: 100% answered, 0 failures, resident memory growth < 10% after warm-up (exit status 0 when met).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench.machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "assets", "examples")
HOST = "127.0.0.1"  # loopback only, never any other address
ENDPOINTS = ("/caption", "/chat", "/match", "/search")
IMAGES = [os.path.join(EXAMPLES, f"scene_{i}.png") for i in range(1, 5)]
GALLERY = IMAGES  # 4 example images
QUESTIONS = ["what color is the shape?", "how many shapes are there?", "what shape is it?"]
TEXTS = "a small green diamond in the center\na large red circle at the top\na blue square on the left"
QUERIES = ["a green diamond", "a red circle", "a blue square"]
# loopback traffic must never go through a proxy, and nothing may phone home
LOCAL_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
             "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port):
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def rss(pid):
    """Resident memory (bytes) of a process and all its children."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class ServerProcess:
    """`python app.py` on loopback in its own session (Ctrl-C reaches only us; we stop it ourselves)."""

    def __init__(self, port, queue_size, log_path, args=(), env=None):
        env = dict(os.environ, **LOCAL_ENV, **(env or {}))
        for k in ("GRADIO_SERVER_NAME", "HOST", "BLIP2_SHARE"):
            env.pop(k, None)
        env["BLIP2_QUEUE_SIZE"] = str(queue_size)
        self.log = open(log_path, "w")
        self.port = port
        self.url = f"http://{HOST}:{port}/"
        self.proc = subprocess.Popen([sys.executable, "app.py", "--host", HOST, "--port", str(port), *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, deadline):
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} (see {self.log.name})")
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not answer in time")

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own process group: the server and its children
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.log.close()


def make_client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, max_workers=2, analytics_enabled=False)


def request_args(endpoint, n, max_new_tokens):
    """(args, api_name) of request number n to an endpoint."""
    from gradio_client import handle_file

    img = handle_file(IMAGES[n % len(IMAGES)])
    if endpoint == "/caption":
        return (img, "", "beam search", 1, 1.0, 0.9, 50, max_new_tokens, 1, 1.0, 1.0, 1)
    if endpoint == "/chat":
        return (img, QUESTIONS[n % len(QUESTIONS)], "beam search", 1, 1.0, 0.9, 50, max_new_tokens, 1, 1.0, 1.0)
    if endpoint == "/match":
        return (img, TEXTS)
    if endpoint == "/search":
        gallery = [{"image": handle_file(p), "caption": None} for p in GALLERY]
        return (gallery, QUERIES[n % len(QUERIES)], 3)
    raise ValueError(endpoint)


def call(client, endpoint, n, max_new_tokens, timeout):
    job = client.submit(*request_args(endpoint, n, max_new_tokens), api_name=endpoint)
    try:
        return job.result(timeout=timeout)
    except BaseException:
        job.cancel()
        raise


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = self.answered = self.not_sent = 0
        self.latencies = []
        self.errors = []  # (endpoint, message)
        self.per_endpoint = {e: [] for e in ENDPOINTS}


def user(uid, url, n_requests, max_new_tokens, deadline, stats, stop):
    try:
        client = make_client(url)
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        with stats.lock:
            stats.not_sent += n_requests  # this user's requests all fail
            stats.errors.extend([("client", f"user {uid}: {type(e).__name__}: {e}")] * n_requests)
        return
    try:
        for i in range(n_requests):
            endpoint = ENDPOINTS[(uid + i) % len(ENDPOINTS)]  # users start on different endpoints
            remaining = deadline - time.monotonic()
            if stop.is_set() or remaining <= 0:
                with stats.lock:
                    stats.not_sent += 1
                    stats.errors.append((endpoint, "not sent: the time bound was reached"))
                continue
            with stats.lock:
                stats.sent += 1
            t0 = time.perf_counter()
            try:
                out = call(client, endpoint, uid * n_requests + i, max_new_tokens, remaining)
                if not isinstance(out, (tuple, list)) or not out:
                    raise RuntimeError(f"unexpected result {out!r:.200}")
            except Exception as e:  # noqa: BLE001
                msg = str(e)[:300] or ("no answer within the time bound" if isinstance(e, TimeoutError) else "")
                with stats.lock:
                    stats.errors.append((endpoint, f"{type(e).__name__}: {msg}"))
                continue
            dt = time.perf_counter() - t0
            with stats.lock:
                stats.answered += 1
                stats.latencies.append(dt)
                stats.per_endpoint[endpoint].append(dt)
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class MainThreadOnly:
    """stderr for the end of a run: gradio_client's background threads print tracebacks (traceback.print_exc)
    when the stopped server closes their connections; only the main thread's messages get through."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.stream.write(text) if threading.current_thread() is threading.main_thread() else len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=32, help="concurrent users (threads, one Client each)")
    p.add_argument("--requests", type=int, default=20, help="requests per user")
    p.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (0: a free one)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="bound on the whole run, startup included")
    p.add_argument("--max-new-tokens", type=int, default=8, help="for /caption and /chat")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.users < 1 or args.requests < 1 or args.timeout_s <= 0:
        p.error("--users, --requests and --timeout-s must be positive")

    t_start = time.monotonic()
    # requests stop this much before the bound, leaving time to collect the figures and stop the server
    deadline = t_start + args.timeout_s - min(15.0, 0.1 * args.timeout_s)
    os.environ.update(LOCAL_ENV)
    port = args.port or free_port()
    if port_in_use(port):
        p.error(f"port {port} on {HOST} is already in use")
    log_path = os.path.join(tempfile.gettempdir(), f"blip2_load_test_server_{port}.log")
    queue_size = 2 * args.users
    server = ServerProcess(port, queue_size, log_path)
    stop = threading.Event()
    default_hook = threading.excepthook
    # once the server is stopped, gradio_client's own background threads fail on the closed connection: quiet
    threading.excepthook = lambda a: None if stop.is_set() else default_hook(a)
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the server too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even where the shell ignored SIGINT
    stats = Stats()
    result = None
    try:
        print(f"starting the app on {server.url} (BLIP2_QUEUE_SIZE={queue_size}; log: {log_path})", flush=True)
        server.wait_ready(deadline)
        t_ready = time.monotonic() - t_start
        warm = make_client(server.url)
        for i, endpoint in enumerate(ENDPOINTS):  # one warm-up request per endpoint
            call(warm, endpoint, i, args.max_new_tokens, max(1.0, deadline - time.monotonic()))
        warm.close()
        rss_start = rss(server.proc.pid)
        print(f"server ready in {t_ready:.1f} s; warmed up; resident memory {rss_start / 2**20:.1f} MiB; {machine()}",
              flush=True)
        print(f"{args.users} users x {args.requests} requests over {', '.join(ENDPOINTS)} "
              f"(max_new_tokens={args.max_new_tokens})", flush=True)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=user, args=(u, server.url, args.requests, args.max_new_tokens,
                                                       deadline, stats, stop), daemon=True)
                   for u in range(args.users)]
        for t in threads:
            t.start()
        last = 0.0
        timeline = []  # (seconds, answered, resident MiB) every 10 s
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 1:
            time.sleep(0.5)
            if time.perf_counter() - last >= 10:
                last = time.perf_counter()
                mib = rss(server.proc.pid) / 2**20
                with stats.lock:
                    timeline.append((round(last - t0, 1), stats.answered, round(mib, 1)))
                    print(f"  {last - t0:6.0f} s: {stats.answered} answered, {len(stats.errors)} failed, "
                          f"server {mib:.1f} MiB", flush=True)
        stop.set()
        elapsed = time.perf_counter() - t0
        rss_end = rss(server.proc.pid)
        with stats.lock:
            total = args.users * args.requests
            failed = total - stats.answered  # sent-but-unanswered and never-sent both count
            lat = stats.latencies
            result = dict(
                users=args.users, requests_per_user=args.requests, max_new_tokens=args.max_new_tokens,
                queue_size=queue_size, sent=stats.sent, not_sent=stats.not_sent, answered=stats.answered,
                failed=failed,
                answered_pct=100.0 * stats.answered / total,
                p50_s=percentile(lat, 50), p95_s=percentile(lat, 95), max_s=max(lat) if lat else float("nan"),
                elapsed_s=elapsed, throughput_rps=stats.answered / elapsed if elapsed > 0 else 0.0,
                per_endpoint={e: dict(n=len(v), p50_s=percentile(v, 50), p95_s=percentile(v, 95))
                              for e, v in stats.per_endpoint.items()},
                rss_start_mib=rss_start / 2**20, rss_end_mib=rss_end / 2**20,
                rss_growth_pct=100.0 * (rss_end - rss_start) / rss_start if rss_start else float("nan"),
                rss_peak_mib=max([m for *_, m in timeline] + [rss_end / 2**20]), timeline=timeline,
                startup_s=t_ready,
                errors=[f"{e}: {m}" for e, m in sorted(stats.errors, key=lambda x: x[1].startswith("not sent"))[:5]],
                error_count=len(stats.errors))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        stop.set()
        return 130
    finally:
        stop.set()
        sys.stderr = MainThreadOnly(sys.stderr)
        server.stop()

    r = result
    print()
    print(f"requests sent      {r['sent']} of {r['users']} x {r['requests_per_user']}"
          + (f" ({r['not_sent']} not sent: time bound)" if r["not_sent"] else ""))
    print(f"answered           {r['answered']} ({r['answered_pct']:.1f}%)")
    print(f"failed             {r['failed']} (every request not answered: errors, time-outs, not sent)")
    for msg in r["errors"]:
        print(f"  - {msg}")
    print(f"latency p50 / p95  {r['p50_s']:.2f} s / {r['p95_s']:.2f} s (max {r['max_s']:.2f} s)")
    for e, v in r["per_endpoint"].items():
        print(f"  {e:9s} n={v['n']:4d}  p50 {v['p50_s']:.2f} s  p95 {v['p95_s']:.2f} s")
    print(f"throughput         {r['throughput_rps']:.2f} requests/s ({r['elapsed_s']:.1f} s)")
    print(f"resident memory    {r['rss_start_mib']:.1f} MiB -> {r['rss_end_mib']:.1f} MiB "
          f"({r['rss_growth_pct']:+.1f}%; peak while running {r['rss_peak_mib']:.1f} MiB)")
    ok = r["failed"] == 0 and r["answered"] == r["users"] * r["requests_per_user"] and r["rss_growth_pct"] < 10
    print(f"targets (100% answered, 0 failed, memory growth < 10%): {'met' if ok else 'NOT met'}")
    print(f"total time         {time.monotonic() - t_start:.1f} s (bound {args.timeout_s:g} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
