"""Train small tokenizers for the world's language, saved in the Hugging Face formats of the real checkpoints.

- OPT side (Salesforce/blip2-opt-*): byte-level BPE, "</s>" (id 2) prepended to every text, nothing appended,
  "<image>" added as the last id. BLIP-2 OPT training texts end with "\\n", the generation EOS.
- Q-Former side (Salesforce/blip2-itm-*): lowercased BERT WordPiece, "[CLS] text [SEP]", "[DEC]" added last.

Usage: python -m blip2.train.tokenizer_training OUT_DIR  (writes OUT_DIR/opt and OUT_DIR/bert from world.corpus())
"""

import json
import string
import sys
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from blip2.train.world import corpus

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in facebook/opt-*
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_tokens_decoder(tok):
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _save(tok, out_dir, config, special_tokens_map):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt (BPE) or vocab.txt (WordPiece)
    _write_json(out / "tokenizer_config.json", {**config, "added_tokens_decoder": _added_tokens_decoder(tok)})
    _write_json(out / "special_tokens_map.json", special_tokens_map)


def train_opt_tokenizer(texts, out_dir, vocab_size=1000):
    """Byte-level BPE like facebook/opt: <s>=0, <pad>=1, </s>=2, <unk>=3, the learnt merges, then <image>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: "\n" is one
    tok.train_from_iterator(texts, trainer)
    # what transformers' GPT2 converter writes for add_bos_token=True (OPT): BOS before each text, no EOS
    tok.post_processor = processors.TemplateProcessing(single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1",
                                                       special_tokens=[("</s>", OPT_SPECIALS.index("</s>"))])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    specials = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
              "errors": "replace", "clean_up_tokenization_spaces": False, **specials}
    _save(tok, out_dir, config, specials)
    return tok


def train_bert_tokenizer(texts, out_dir, vocab_size=1000):
    """Lowercasing WordPiece like bert-base-uncased: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, ..., [DEC].

    The vocabulary is built directly rather than with tokenizers' WordPieceTrainer, whose ids depend on hash
    order from run to run: the special tokens, every character seen plus ASCII letters, digits and punctuation,
    each also as a "##" continuation (so any such text encodes without [UNK]), then the most frequent words.
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation).union(*counts))
    vocab = BERT_SPECIALS + chars + ["##" + c for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece(prefix="##")
    tok.add_special_tokens(BERT_SPECIALS)
    cls, sep = BERT_SPECIALS.index("[CLS]"), BERT_SPECIALS.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0",
                                                       pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.add_special_tokens([AddedToken("[DEC]", special=True, normalized=False)])  # BLIP-2's decoder BOS
    specials = {"bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                "sep_token": "[SEP]", "unk_token": "[UNK]"}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
              "strip_accents": None, "model_max_length": 512, "clean_up_tokenization_spaces": True, **specials}
    _save(tok, out_dir, config, specials)
    return tok


if __name__ == "__main__":
    texts = list(corpus())
    out = Path(sys.argv[1])
    train_opt_tokenizer(texts, out / "opt")
    train_bert_tokenizer(texts, out / "bert")
