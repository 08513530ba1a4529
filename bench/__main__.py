"""python -m bench NAME [ARGS]: run bench/NAME.py (speed, memory, ...) with its arguments."""

import importlib
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m bench NAME [ARGS]   (e.g. python -m bench speed --repeat 3)")
    name = sys.argv.pop(1)
    sys.exit(importlib.import_module(f"bench.{name}").main())
