"""blip2.retrieval's Retriever (through Blip2Runner): ITM and ITC scores equal the model's forward, image features
cached by content, texts cut to the Q-Former's positions flagged."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoints import shared_checkpoint

import blip2
from blip2.processing import Blip2Processor
from blip2.runner import Blip2Runner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def itm():
    path = shared_checkpoint("itm")
    return blip2.Blip2ForImageTextRetrieval.from_pretrained(path), Blip2Processor.from_pretrained(path)


def image(seed=0, size=(40, 50)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


def test_match_equals_model_forward_and_caches(itm):
    model, proc = itm
    img, runner = image(7), Blip2Runner(itm_model=model, itm_processor=proc)
    texts = ["a cat on a red sofa", "two dogs in the snow", "an old coffee cup", ""]
    got = runner.match(img, texts)
    enc = proc.tokenizer(texts, padding=True, return_tensors="pt")
    px = proc.image_processor(img, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=px.expand(len(texts), -1, -1, -1), input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"], use_image_text_matching_head=True)
        itc = model(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert [m.text for m in got] == texts
    assert np.allclose([m.itm for m in got], ref.logits_per_image.softmax(-1)[:, 1], atol=1e-5)
    assert np.allclose([m.itc for m in got], itc.logits_per_image[0], atol=1e-5)
    assert runner.match(img, texts) == got and runner.stats["feature_hits"] == 2
    long = runner.match(img, ["word " * 100])[0]
    assert long.truncated and 0 <= long.itm <= 1
    assert runner.match(img, []) == []
    images, txt = runner.itc_images([img, image(8)]), runner.itc_texts(texts[:2])
    assert images.shape == (2, 4, 8) and txt.shape == (2, 8)
    with torch.no_grad():
        assert torch.allclose(images[:1], model.itc_image_embeds(model.vision_model(px).last_hidden_state), atol=1e-6)
    assert torch.allclose(torch.einsum("qe,te->qt", images[0], txt).amax(0), torch.tensor([m.itc for m in got[:2]]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="captioning model"):
        runner.caption(img)
