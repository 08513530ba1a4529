"""Small but genuine Hugging Face tokenizer directories for the three BLIP-2 tokenizer families.

Each tokenizer is trained with the `tokenizers` library on a tiny built-in corpus (with some
non-ASCII text, so byte-level BPE splits multi-byte characters across tokens) and saved through
transformers' own tokenizer classes, so the files are exactly what transformers writes.
Every function writes into `directory` and returns it as a str; the directory also gets a
preprocessor_config.json and a processor_config.json, so `transformers.Blip2Processor.from_pretrained`
works on it. Used by the tests and bench.speed (which never imports tests/); imports transformers, as both do.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "Question: what is the man holding? Answer: a surfboard.",
    "two dogs are playing in the snow, and one of them is barking!",
    "The astronaut floats above the Earth; the sky is black.",
    "an old coffee cup on a wooden table next to a newspaper",
    "A rocket launches from the pad at night (with bright flames).",
    "Question: how many people are in the picture? Answer: three",
    "the camera man looks at the lens - it's a sunny day.",
    "She said: \"I don't know\", and left at 5 o'clock.",
    "a little café in Zürich serves crème brûlée and naïve smoothies",
    "Grüße aus München, schöne Straße",
    "東京の猫はかわいい。日本語の文章です。",
    "Привет, как дела? Это кошка.",
    "emoji test 🙂 🚀 🐱 party 🎉 done",
    "numbers 1234 and 56.78 and 9,000 apples\nnew line here\n",
] * 3

SIZE = 32  # image side for the tiny preprocessor configs
NUM_QUERY_TOKENS = 4


def _write_processor_files(directory, size=SIZE, num_query_tokens=NUM_QUERY_TOKENS):
    pre = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Blip2Processor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": size, "width": size},
    }
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    with open(os.path.join(directory, "processor_config.json"), "w") as f:
        json.dump({"num_query_tokens": num_query_tokens, "processor_class": "Blip2Processor"}, f, indent=2)
    return str(directory)


def _train_byte_level_bpe(vocab_size=420):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def opt_tokenizer_dir(directory):
    """OPT-style byte-level BPE: <s>=0 <pad>=1 </s>=2 <unk>=3, bos = eos = unk = </s>, BOS prepended."""
    from transformers import GPT2Tokenizer

    bpe = json.loads(_train_byte_level_bpe().to_str())["model"]
    tok = GPT2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]],
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=2048,
    )
    tok.save_pretrained(directory)
    return _write_processor_files(directory)


def opt_vocab_merges_dir(directory):
    """The same OPT-style tokenizer as facebook/opt-* ship it: vocab.json + merges.txt + configs only."""
    os.makedirs(directory, exist_ok=True)
    _train_byte_level_bpe().model.save(str(directory))  # writes vocab.json and merges.txt
    def added(content):  # how facebook/opt-* tokenizer_config.json spell their special tokens
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    config = {
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": added("</s>"),
        "eos_token": added("</s>"),
        "unk_token": added("</s>"),
        "pad_token": added("<pad>"),
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPT2Tokenizer",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return _write_processor_files(directory)


def t5_tokenizer_dir(directory, extra_ids=8):
    """T5-style Unigram: <pad>=0 </s>=1 <unk>=2, <extra_id_*> sentinels, </s> appended."""
    from transformers import T5Tokenizer

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    uni.train_from_iterator(CORPUS, trainer)
    vocab = [tuple(v) for v in json.loads(uni.to_str())["model"]["vocab"]]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]  # as T5's converter orders them
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=512)
    tok.save_pretrained(directory)
    return _write_processor_files(directory)


def _train_wordpiece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def bert_tokenizer_dir(directory):
    """bert-base-uncased-style WordPiece: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, plus an added bos
    token [DEC] like the BLIP-2 ITM checkpoint; encodes as [CLS] text [SEP]."""
    from transformers import BertTokenizer

    vocab = _train_wordpiece().get_vocab(with_added_tokens=True)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    tok.save_pretrained(directory)
    return _write_processor_files(directory)


def bert_vocab_txt_dir(directory):
    """The same WordPiece vocabulary as a classic vocab.txt-only checkpoint (bert-base-uncased style)."""
    os.makedirs(directory, exist_ok=True)
    _train_wordpiece().model.save(str(directory))  # writes vocab.txt
    config = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return _write_processor_files(directory)
