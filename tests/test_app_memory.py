"""The app's memory check on a free CPU Space (16 GB, about 15 GB of it free for the model) with the real
checkpoints' architectures (bench/checkpoints.py, written as headers only: sparse files, no weights): int4 admits
every one; bf16 is refused for OPT-6.7B and Flan-T5-XXL, and the refusal says that int4 fits."""

import pytest
import torch

import app.registry
import blip2
from app.config import Limits
from app.errors import RequestError
from app.registry import GENERATION, Checkpoint, ModelSettings
from app.service import Service
from bench.checkpoints import write_checkpoint

FREE = 15 * 10**9  # what a 16 GB machine leaves the model after the OS, Python, torch and Gradio


class Admitted(Exception):
    """Raised by the patched from_pretrained: the memory check let the load through."""


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-architectures")
    return {m: write_checkpoint(m, str(root / m), weights=False)
            for m in ("opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl")}


@pytest.fixture
def service(headers, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(app.registry, "available_memory_bytes", lambda device: FREE)

    def from_pretrained(cls, *a, **k):
        raise Admitted("past the memory check")

    monkeypatch.setattr(blip2.Blip2ForConditionalGeneration, "from_pretrained", classmethod(from_pretrained))

    def make(quantize):
        checkpoints = [Checkpoint(m, ((GENERATION, path),)) for m, path in headers.items()]
        return Service(settings=ModelSettings(quantize=quantize, dtype="bfloat16"), limits=Limits(),
                       extra_checkpoints=checkpoints)

    yield make
    torch.set_num_threads(threads)


def admitted(svc: Service, key: str) -> bool:
    with pytest.raises(RequestError) as e:
        svc.registry.get(key, GENERATION)
    return "past the memory check" in str(e.value)


@pytest.mark.parametrize("model", ["opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl"])
def test_int4_admits_every_checkpoint_on_16_gb(service, model):
    assert admitted(service("int4"), model)


def test_bf16_refusal_says_that_int4_fits(service, headers):
    svc = service(None)
    assert admitted(svc, "opt-2.7b") and admitted(svc, "flan-t5-xl")  # 7.5 / 7.8 GB in bf16
    for model in ("opt-6.7b", "flan-t5-xxl"):  # 15.5 / 24.2 GB in bf16
        with pytest.raises(RequestError) as e:
            svc.registry.get(model, GENERATION)
        int4 = blip2.memory_report(headers[model], dtype="bfloat16", quantization="int4_weight_only").total
        assert int4 < FREE
        assert str(e.value).endswith(f"only {FREE / 2**30:.1f} GB is free; still serving the model loaded "
                                        f"before. In int4 it needs about {int4 / 2**30:.1f} GB, which fits: start "
                                        f"the app with --quantize int4 (BLIP2_QUANTIZE=int4)"), str(e.value)
