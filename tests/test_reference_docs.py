"""Every code example of the reference's BLIP-2 documentation (the docstrings of transformers 5.24's
configuration_blip_2.py and modeling_blip_2.py, rendered on its model_doc/blip-2 page), run twice: as written with
`from transformers import ...`, and with `from blip2 import ...`, on tiny local checkpoints placed in a temporary
Hugging Face hub cache under the Salesforce ids; their results are compared.

Changes to the examples, the same for both runs: the image comes from a local file instead of a URL (offline), the
device is the CPU, and the full-size default configs build their models on the meta device (1-4 B parameters).
blip2 has no Auto* classes (it is one model family): its run imports Blip2Processor / Blip2Tokenizer under those
names. The int8 example runs on the CPU (device_map={"": "cpu"}): blip2 quantizes with bitsandbytes' CPU backend,
the reference 5.24 takes load_in_8bit as a config attribute and does not quantize, so there the texts are checked
to be text, not compared."""

import os

import pytest
import torch
from PIL import Image
from tiny_checkpoints import fake_hub_cache, shared_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "examples", "chelsea_cat.jpg")
PROLOGUE = f"""
import torch
from PIL import Image
def load_image(url):  # offline: a local photograph instead of the URL
    return Image.open({IMAGE!r}).convert("RGB")
device = "cpu"
"""

EXAMPLES = {
    "Blip2VisionConfig": """
from LIB import Blip2VisionConfig, Blip2VisionModel
configuration = Blip2VisionConfig()
with torch.device("meta"):
    model = Blip2VisionModel(configuration)
configuration = model.config
""",
    "Blip2QFormerConfig": """
from LIB import Blip2QFormerConfig, Blip2QFormerModel
configuration = Blip2QFormerConfig()
with torch.device("meta"):
    model = Blip2QFormerModel(configuration)
configuration = model.config
""",
    "Blip2Config": """
from LIB import (
    Blip2VisionConfig,
    Blip2QFormerConfig,
    OPTConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
)
configuration = Blip2Config()
with torch.device("meta"):
    model = Blip2ForConditionalGeneration(configuration)
configuration = model.config
vision_config = Blip2VisionConfig()
qformer_config = Blip2QFormerConfig()
text_config = OPTConfig()
config = Blip2Config(vision_config=vision_config, qformer_config=qformer_config, text_config=text_config)
""",
    "get_text_features": """
from LIB import AutoTokenizer, Blip2Model
model = Blip2Model.from_pretrained("Salesforce/blip2-opt-2.7b")
tokenizer = AutoTokenizer.from_pretrained("Salesforce/blip2-opt-2.7b")
inputs = tokenizer(["a photo of a cat"], padding=True, return_tensors="pt")
with torch.inference_mode():
    text_features = model.get_text_features(**inputs)
""",
    "get_image_features": """
from LIB import AutoProcessor, Blip2Model
model = Blip2Model.from_pretrained("Salesforce/blip2-opt-2.7b")
processor = AutoProcessor.from_pretrained("Salesforce/blip2-opt-2.7b")
url = "http://images.cocodataset.org/val2017/000000039769.jpg"
image = load_image(url)
inputs = processor(images=image, return_tensors="pt")
with torch.inference_mode():
    image_outputs = model.get_image_features(**inputs)
""",
    "get_qformer_features": """
from LIB import AutoProcessor, Blip2Model, Blip2Processor
processor = Blip2Processor.from_pretrained("Salesforce/blip2-opt-2.7b")
model = Blip2Model.from_pretrained("Salesforce/blip2-opt-2.7b")
url = "http://images.cocodataset.org/val2017/000000039769.jpg"
image = load_image(url)
inputs = processor(images=image, return_tensors="pt")
with torch.inference_mode():
    qformer_outputs = model.get_qformer_features(**inputs)
""",
    "Blip2Model.forward": """
from LIB import Blip2Processor, Blip2Model
processor = Blip2Processor.from_pretrained("Salesforce/blip2-opt-2.7b")
model = Blip2Model.from_pretrained("Salesforce/blip2-opt-2.7b", dtype=torch.float16)
model.to(device)
image = load_image(None)
prompt = "Question: how many cats are there? Answer:"
inputs = processor(images=image, text=prompt, return_tensors="pt").to(device, torch.float16)
outputs = model(**inputs)
""",
    "Blip2TextModelWithProjection": """
from LIB import AutoProcessor, Blip2TextModelWithProjection
model = Blip2TextModelWithProjection.from_pretrained(
    "Salesforce/blip2-itm-vit-g", dtype=torch.float16
)
model.to(device)
processor = AutoProcessor.from_pretrained("Salesforce/blip2-itm-vit-g")
inputs = processor(text=["a photo of a cat", "a photo of a dog"], return_tensors="pt").to(device)
outputs = model(**inputs)
text_embeds = outputs.text_embeds
shape = text_embeds.shape
""",
    "Blip2VisionModelWithProjection": """
from LIB import AutoProcessor, Blip2VisionModelWithProjection
processor = AutoProcessor.from_pretrained("Salesforce/blip2-itm-vit-g")
model = Blip2VisionModelWithProjection.from_pretrained(
    "Salesforce/blip2-itm-vit-g", dtype=torch.float16
)
model.to(device)
url = "http://images.cocodataset.org/val2017/000000039769.jpg"
image = load_image(url)
inputs = processor(images=image, return_tensors="pt").to(device, torch.float16)
with torch.inference_mode():
    outputs = model(**inputs)
image_embeds = outputs.image_embeds
shape = image_embeds.shape
""",
    "Blip2ForConditionalGeneration": """
from LIB import Blip2Processor, Blip2ForConditionalGeneration
processor = Blip2Processor.from_pretrained("Salesforce/blip2-opt-2.7b")
model = Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-opt-2.7b", dtype=torch.float16)
image = load_image(None)
inputs = processor(images=image, return_tensors="pt").to(device, torch.float16)
generated_ids = model.generate(**inputs)
generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
prompt = "Question: how many cats are there? Answer:"
inputs = processor(images=image, text=prompt, return_tensors="pt").to(device=device, dtype=torch.float16)
vqa_ids = model.generate(**inputs)
vqa_text = processor.batch_decode(vqa_ids, skip_special_tokens=True)[0].strip()
""",
    "Blip2ForConditionalGeneration int8": """
from LIB import Blip2Processor, Blip2ForConditionalGeneration
processor = Blip2Processor.from_pretrained("Salesforce/blip2-opt-2.7b")
image = load_image(None)
prompt = "Question: how many cats are there? Answer:"
model = Blip2ForConditionalGeneration.from_pretrained(
    "Salesforce/blip2-opt-2.7b", load_in_8bit=True, device_map={"": "cpu"}, dtype=torch.bfloat16
)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(device=device, dtype=torch.bfloat16)
generated_ids = model.generate(**inputs)
generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
""",
    "Blip2ForImageTextRetrieval": """
from LIB import AutoProcessor, Blip2ForImageTextRetrieval
model = Blip2ForImageTextRetrieval.from_pretrained("Salesforce/blip2-itm-vit-g", dtype=torch.float16)
processor = AutoProcessor.from_pretrained("Salesforce/blip2-itm-vit-g")
model.to(device)
image = load_image(None)
text = "two cats laying on a pink blanket"
inputs = processor(images=image, text=text, return_tensors="pt").to(device, torch.float16)
itm_out = model(**inputs, use_image_text_matching_head=True)
logits_per_image = torch.nn.functional.softmax(itm_out.logits_per_image, dim=1)
probs = logits_per_image.softmax(dim=1)
itm_lines = [f"{probs[0][0]:.1%} that image 0 is not '{text}'", f"{probs[0][1]:.1%} that image 0 is '{text}'"]
texts = ["a photo of a cat", "a photo of a dog"]
inputs = processor(images=image, text=texts, return_tensors="pt").to(device, torch.float16)
itc_out = model(**inputs, use_image_text_matching_head=False)
logits_per_image = itc_out.logits_per_image
probs = logits_per_image.softmax(dim=1)
itc_lines = [f"{probs[0][0]:.1%} that image 0 is '{texts[0]}'", f"{probs[0][1]:.1%} that image 0 is '{texts[1]}'"]
""",
}
BLIP2_IMPORTS = {"AutoProcessor": "Blip2Processor as AutoProcessor", "AutoTokenizer": "Blip2Tokenizer as AutoTokenizer"}


def run(name, lib):
    code = EXAMPLES[name].replace("from LIB import", f"from {lib} import")
    if lib == "blip2":
        first, rest = code.split("\n", 2)[1], code.split("\n", 2)[2]
        for auto, ours in BLIP2_IMPORTS.items():
            first = first.replace(auto, ours)
        code = "\n" + first + "\n" + rest
    namespace = {}
    exec(PROLOGUE + code, namespace)
    return namespace


@pytest.fixture(scope="module", autouse=True)
def salesforce_hub(tmp_path_factory):
    """The tiny checkpoints under the Salesforce ids in a fresh hub cache, for both libraries, offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path_factory.mktemp("hub")
    fake_hub_cache(cache, "Salesforce/blip2-opt-2.7b", shared_checkpoint("opt"))
    fake_hub_cache(cache, "Salesforce/blip2-itm-vit-g", shared_checkpoint("itm"))
    saved = os.environ.get("HF_HUB_CACHE"), constants.HF_HUB_CACHE
    os.environ["HF_HUB_CACHE"] = constants.HF_HUB_CACHE = str(cache)
    yield
    if saved[0] is None:
        os.environ.pop("HF_HUB_CACHE")
    else:
        os.environ["HF_HUB_CACHE"] = saved[0]
    constants.HF_HUB_CACHE = saved[1]


def close(a, b, tol):
    return a.shape == b.shape and bool(((a.float() - b.float()).abs() <= tol).all())


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["Blip2VisionConfig", "Blip2QFormerConfig", "Blip2Config"])
def test_config_examples(name):
    ref, ours = run(name, "transformers"), run(name, "blip2")
    assert shapes(ours["model"]) == shapes(ref["model"])
    assert ours["configuration"] is ours["model"].config
    if name == "Blip2Config":
        assert ours["config"].text_config.word_embed_proj_dim == ref["config"].text_config.word_embed_proj_dim


def test_blip2_model_feature_examples():
    for name, key, get in (("get_text_features", "text_features", lambda o: o.last_hidden_state),
                           ("get_image_features", "image_outputs", lambda o: o.last_hidden_state),
                           ("get_qformer_features", "qformer_outputs", lambda o: o)):
        ref, ours = run(name, "transformers"), run(name, "blip2")
        assert close(get(ref[key]), get(ours[key]), 1e-4), name


def test_blip2_model_forward_example_in_float16():
    ref, ours = run("Blip2Model.forward", "transformers"), run("Blip2Model.forward", "blip2")
    a, b = ref["outputs"].logits, ours["outputs"].logits
    assert a.dtype == b.dtype == torch.float16
    assert close(a, b, 2e-2 * float(a.detach().float().abs().max()))


def padded(name):
    """An example whose texts have one length under the real BERT tokenizer but not under the tiny one: both
    libraries refuse the ragged batch as written; the name of the example run with padding=True."""
    for lib in ("transformers", "blip2"):
        with pytest.raises(ValueError):
            run(name, lib)
    EXAMPLES[name + " padded"] = EXAMPLES[name].replace('text=texts, return_tensors="pt")',
                                                        'text=texts, padding=True, return_tensors="pt")').replace(
        '"a photo of a dog"], return_tensors="pt")', '"a photo of a dog"], padding=True, return_tensors="pt")')
    return name + " padded"


def test_projection_model_examples_in_float16():
    for name, key in ((padded("Blip2TextModelWithProjection"), "text_embeds"),
                      ("Blip2VisionModelWithProjection", "image_embeds")):
        ref, ours = run(name, "transformers"), run(name, "blip2")
        assert ours["shape"] == ref["shape"], name
        assert close(ref[key], ours[key], 5e-3), name


def test_conditional_generation_examples():
    ref, ours = run("Blip2ForConditionalGeneration", "transformers"), run("Blip2ForConditionalGeneration", "blip2")
    assert torch.equal(ref["generated_ids"], ours["generated_ids"]) and torch.equal(ref["vqa_ids"], ours["vqa_ids"])
    assert ref["generated_text"] == ours["generated_text"] and ref["vqa_text"] == ours["vqa_text"]


def test_int8_example_runs_quantized():
    ours = run("Blip2ForConditionalGeneration int8", "blip2")
    layer = ours["model"].language_model.model.decoder.layers[0].self_attn.q_proj
    assert "8bit" in type(layer).__name__ or "Int8" in type(layer).__name__
    assert isinstance(ours["generated_text"], str) and ours["generated_ids"].shape[0] == 1


def test_image_text_retrieval_example_prints_the_same():
    name = padded("Blip2ForImageTextRetrieval")
    ref, ours = run(name, "transformers"), run(name, "blip2")
    assert ours["itm_lines"] == ref["itm_lines"] and ours["itc_lines"] == ref["itc_lines"]


def test_every_example_is_covered():
    # the docstring examples of transformers 5.24's BLIP-2 (the caption and VQA ones in one, the int8 ones in one)
    assert len([n for n in EXAMPLES if not n.endswith("padded")]) == 12
    assert isinstance(Image.open(IMAGE), Image.Image)
