"""The Salesforce BLIP-2 checkpoints on the Hugging Face Hub: what each one is for.

Kept with the models (as LAVIS keeps its model zoo), so the app's model picker and the README read one
list. A task names the class that loads the checkpoint. Also where the embedded tiny checkpoints are.
"""

from dataclasses import dataclass
from pathlib import Path

GENERATION, RETRIEVAL = "generation", "retrieval"  # Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

# the embedded tiny checkpoints (trained on a world of coloured shapes by blip2.train), shipped inside the package:
# the command line's, the app's and the benchmarks' default models
EMBEDDED_MODELS = {GENERATION: Path(__file__).resolve().parent / "assets" / "blip2-tiny",
                   RETRIEVAL: Path(__file__).resolve().parent / "assets" / "blip2-tiny-itm"}


@dataclass(frozen=True)
class KnownCheckpoint:
    repo_id: str
    task: str  # GENERATION or RETRIEVAL
    note: str


CHECKPOINTS = (
    KnownCheckpoint("Salesforce/blip2-opt-2.7b", GENERATION, "OPT-2.7b, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-opt-6.7b", GENERATION, "OPT-6.7b, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-opt-2.7b-coco", GENERATION, "OPT-2.7b, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-opt-6.7b-coco", GENERATION, "OPT-6.7b, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xl", GENERATION, "Flan-T5-XL, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xl-coco", GENERATION, "Flan-T5-XL, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xxl", GENERATION, "Flan-T5-XXL, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-itm-vit-g", RETRIEVAL, "image-text matching / retrieval (ITM + ITC)"),
    KnownCheckpoint("Salesforce/blip2-itm-vit-g-coco", RETRIEVAL, "image-text matching / retrieval, COCO"),
)
