"""Tiny random BLIP-2 checkpoint directories that also hold a genuine tokenizer and processor files: the model's
vocabulary is sized to the tokenizer (with its "<image>" token). Test-only: written by transformers."""

import atexit
import functools
import hashlib
import os
import shutil
import tempfile

from tiny_models import NUM_QUERY, OPT, QFORMER, T5, VISION, config, reference_model

from bench import tiny_tokenizers

IMAGE_SIZE = 32  # tiny_tokenizers' preprocessor size
TOKENIZERS = {"opt": tiny_tokenizers.opt_tokenizer_dir, "t5": tiny_tokenizers.t5_tokenizer_dir,
              "itm": tiny_tokenizers.bert_tokenizer_dir}


def vocabulary(directory):
    """(vocabulary size, "<image>" id) of the processor saved in `directory`."""
    from blip2.processing import Blip2Processor

    p = Blip2Processor.from_pretrained(directory)
    return len(p.tokenizer), p.tokenizer.convert_tokens_to_ids(p.image_token)


def checkpoint(directory, family="opt", seed=0, text=None):
    """Write a tiny "opt", "t5" (Blip2ForConditionalGeneration) or "itm" (Blip2ForImageTextRetrieval) checkpoint
    with its tokenizer into `directory`; returns it as a str. text: settings of the language model's config that
    differ from the tiny ones."""
    directory = str(directory)
    TOKENIZERS[family](directory)
    size, image_id = vocabulary(directory)
    vision = dict(VISION, image_size=IMAGE_SIZE)
    if family == "itm":
        from transformers import Blip2Config

        qformer = dict(QFORMER, vocab_size=size, use_qformer_text_input=True)
        cfg = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=NUM_QUERY,
                          image_text_hidden_size=8)
        cls = "Blip2ForImageTextRetrieval"
    else:
        lm = (dict(OPT, vocab_size=size, eos_token_id=2, max_position_embeddings=128) if family == "opt"
              else dict(T5, vocab_size=size))
        cfg = config(text=lm | (text or {}), vision=vision, image_token_index=image_id)
        cls = "Blip2ForConditionalGeneration"
    reference_model(cls, cfg, seed).save_pretrained(directory)
    return directory


@functools.cache
def shared_checkpoint(family):
    """One checkpoint per family for the whole test session (removed at exit)."""
    directory = tempfile.mkdtemp(prefix=f"blip2-tiny-{family}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return checkpoint(directory, family)


def fake_hub_cache(cache, repo_id, src, revision="main"):
    """The standard cache layout huggingface_hub writes: blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/<revision> = commit."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for f in os.listdir(src):
        data = open(os.path.join(src, f), "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        open(blob, "wb").write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, f))
    open(os.path.join(repo, "refs", revision), "w").write(commit)
    return snap
