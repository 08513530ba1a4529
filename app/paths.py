"""Where the app's own files live."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"  # the embedded models: blip2.catalogue.EMBEDDED_MODELS
