"""blip2.explain: Grad-CAM of the embedded retrieval model peaks on the object a text names; without gradients
(a quantized model) the plain cross-attention stands in."""

import app_support as S
import numpy as np
import torch

from blip2 import Blip2ForImageTextRetrieval, Blip2Processor
from blip2.catalogue import EMBEDDED_MODELS, RETRIEVAL
from blip2.explain import relevance_grid
from blip2.train.world import POSITIONS

ITM = str(EMBEDDED_MODELS[RETRIEVAL])


def _inputs(model, processor, image, text):
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = model.vision_model(pixels).last_hidden_state  # (1, 1+N, D_v)
    enc = processor.tokenizer([text], return_tensors="pt")
    return states, enc["input_ids"], enc["attention_mask"]


def test_grad_cam_peaks_in_the_objects_cell(monkeypatch):
    model, processor = Blip2ForImageTextRetrieval.from_pretrained(ITM), Blip2Processor.from_pretrained(ITM)
    for scene in S.one_object_scenes(4):
        o = scene.objects[0]
        args = _inputs(model, processor, scene.render(224), f"a {o.size} {o.color} {o.shape}")
        grid, method = relevance_grid(model, *args)
        assert method == "Grad-CAM" and grid.shape == (6, 6)
        cells = grid.numpy().reshape(3, 2, 3, 2).sum((1, 3))  # the world's 3x3 layout, 2x2 patches each
        row, col = np.unravel_index(cells.argmax(), cells.shape)
        assert POSITIONS[row * 3 + col] == o.position, (scene.caption(), cells.round(3))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no graph")))
    grid, method = relevance_grid(model, *args)
    assert method == "cross-attention" and grid.shape == (6, 6) and float(grid.min()) >= 0
