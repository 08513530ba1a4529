"""The Salesforce BLIP-2 checkpoints on the Hugging Face Hub: what each one is for, and how big it is.

Kept with the models (as LAVIS keeps its model zoo), so the app's model picker, its memory check and the README
read one list. A task names the class that loads the checkpoint.
"""

from dataclasses import dataclass

GENERATION, RETRIEVAL = "generation", "retrieval"  # Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval


@dataclass(frozen=True)
class KnownCheckpoint:
    repo_id: str
    task: str  # GENERATION or RETRIEVAL
    params_b: float  # billions of parameters (weights of every part), for memory estimates
    note: str


CHECKPOINTS = (
    KnownCheckpoint("Salesforce/blip2-opt-2.7b", GENERATION, 3.9, "OPT-2.7b, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-opt-6.7b", GENERATION, 7.8, "OPT-6.7b, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-opt-2.7b-coco", GENERATION, 3.9, "OPT-2.7b, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-opt-6.7b-coco", GENERATION, 7.8, "OPT-6.7b, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xl", GENERATION, 3.9, "Flan-T5-XL, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xl-coco", GENERATION, 3.9, "Flan-T5-XL, fine-tuned on COCO captions"),
    KnownCheckpoint("Salesforce/blip2-flan-t5-xxl", GENERATION, 12.2, "Flan-T5-XXL, pre-trained"),
    KnownCheckpoint("Salesforce/blip2-itm-vit-g", RETRIEVAL, 1.2, "image-text matching / retrieval (ITM + ITC)"),
    KnownCheckpoint("Salesforce/blip2-itm-vit-g-coco", RETRIEVAL, 1.2, "image-text matching / retrieval, COCO"),
)
