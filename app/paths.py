"""Where the app's own files live."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
EXAMPLES_DIR = ASSETS / "examples"
EMBEDDED_GENERATION = ASSETS / "blip2-tiny"
EMBEDDED_RETRIEVAL = ASSETS / "blip2-tiny-itm"
