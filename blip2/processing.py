"""Blip2Processor: a drop-in for transformers' Blip2Processor (5.24): BlipImageProcessor (image_processing.py) and
Blip2Tokenizer (tokenizer.py), with the "<image>" placeholders BLIP-2 expects prepended to the text."""

import json
import os
from typing import Any

from tokenizers import AddedToken

from .features import BatchFeature, dump_json, load_json
from .image_processing import BlipImageProcessor, Images
from .io.hub import PROCESSOR_FILES, resolve_checkpoint
from .tokenizer import Blip2Tokenizer


class Blip2Processor:
    """Images -> pixel_values and text -> input_ids / attention_mask, with num_query_tokens "<image>"
    placeholders prepended to every text row when images come with the text (transformers 5.24). The tokenizer
    may be any object with the Hugging Face tokenizer API (a transformers tokenizer, say), as the image processor
    any with BlipImageProcessor's."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: Blip2Tokenizer,
                 num_query_tokens: int | None = None, **_: Any):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        if getattr(tokenizer, "image_token", None) is not None:
            self.image_token = tokenizer.image_token
        else:  # like the reference: a special added token taking the next free id (or its existing id)
            self.image_token = "<image>"
            tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, image_processor: BlipImageProcessor | None = None,
                        tokenizer: Blip2Tokenizer | None = None, num_query_tokens: int | None = None,
                        **hub_kwargs: Any) -> "Blip2Processor":
        """A local directory or a hub id (revision=, cache_dir=, token=, local_files_only=): only the processor
        and tokenizer files are fetched. image_processor= / tokenizer= / num_query_tokens= replace what the
        directory holds, as the reference's keyword overrides."""
        directory = resolve_checkpoint(directory, allow_patterns=PROCESSOR_FILES + ["config.json"], **hub_kwargs)
        config = load_json(os.path.join(directory, "processor_config.json"), {})
        if image_processor is not None:
            pass
        elif "image_processor" in config:  # transformers 5.x nests the image processor config here
            image_processor = BlipImageProcessor.from_dict(config["image_processor"])
        else:
            image_processor = BlipImageProcessor.from_pretrained(directory)
        if tokenizer is None:
            tokenizer = Blip2Tokenizer.from_pretrained(directory)
        if num_query_tokens is None:
            num_query_tokens = config.get("num_query_tokens")
        return cls(image_processor, tokenizer, num_query_tokens)

    @classmethod
    def get_attributes(cls) -> list[str]:
        return list(cls.attributes)

    @property
    def model_input_names(self) -> list[str]:
        """pixel_values and the tokenizer's input names, as the reference lists them."""
        names = ["pixel_values"] + list(getattr(self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict:
        """processor_config.json's content as the reference writes it (the image processor nested)."""
        image = {k: v for k, v in self.image_processor.to_dict().items() if k != "processor_class"}
        return {"image_processor": image, "num_query_tokens": self.num_query_tokens,
                "processor_class": type(self).__name__}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__}:\n- image_processor: {self.image_processor!r}\n- tokenizer: " \
               f"{self.tokenizer!r}\n\n{self.to_json_string()}"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Hub layout: preprocessor_config.json, processor_config.json and the tokenizer files."""
        os.makedirs(directory, exist_ok=True)
        dump_json(os.path.join(directory, "preprocessor_config.json"),
                    self.image_processor.to_dict() | {"processor_class": "Blip2Processor"})
        dump_json(os.path.join(directory, "processor_config.json"),
                    {"num_query_tokens": self.num_query_tokens, "processor_class": "Blip2Processor"})
        self.tokenizer.config["processor_class"] = "Blip2Processor"
        self.tokenizer.save_pretrained(directory)

    def __call__(self, images: Images | None = None, text: str | list[str] | None = None,
                 return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        kwargs |= kwargs.pop("text_kwargs", {}) | kwargs.pop("images_kwargs", {})
        image_kwargs = {k: kwargs.pop(k) for k in BlipImageProcessor.KEYS if k in kwargs}
        text_kwargs = {"return_token_type_ids": False, **kwargs}
        if text_kwargs.get("max_length") is not None:  # the placeholders are not counted by the tokenizer
            text_kwargs["max_length"] -= self.num_query_tokens or 0
        out = BatchFeature()
        if text is not None:
            if isinstance(text, str):
                text = [text]
            elif not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
                raise ValueError("Invalid input text: expected a string or a non-empty list of strings, "
                                 f"got {type(text).__name__}")
            out |= self.tokenizer(text, **text_kwargs)
            if images is not None and self.num_query_tokens is not None:
                placeholder = self.tokenizer(self.image_token * self.num_query_tokens, **text_kwargs | {
                    "add_special_tokens": False, "padding": False, "truncation": False})
                for key in out:
                    out[key] = [placeholder[key] + row for row in out[key]]
        if images is not None:
            out |= self.image_processor(images, **image_kwargs)
        return out.convert(return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
