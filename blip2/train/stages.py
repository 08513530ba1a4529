"""The BLIP-2 recipe at small scale, one function per stage.

0. `vision`: a ViT learns the world on its own (the mean of each cell's patch tokens predicts the shape, colour
   and size of the object there, or that the cell is empty).
   `lm`: an OPT learns the world's language (captions, prompts, answers after a scene description).
   Both are frozen from here on, as the pre-trained image encoder and LLM of the paper.
1. `qformer`: the Q-Former learns from the frozen image encoder with ITC + ITM (hard negatives) + ITG.
   Result: the retrieval model (Blip2ForImageTextRetrieval).
2. `bridge`: the Q-Former's queries, through `language_projection`, prompt the frozen OPT (language-modelling
   loss on the answer only). Result: Blip2ForConditionalGeneration.
"""

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2VisionModel, OPTConfig
from blip2.opt import OPTForCausalLM, causal_lm_loss
from blip2.processing import Blip2Processor, Blip2Tokenizer, BlipImageProcessor
from blip2.train import data, losses, world
from blip2.train.tokenizer_training import train_bert_tokenizer, train_opt_tokenizer


@dataclass
class Recipe:
    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    qformer_hidden: int = 96
    qformer_layers: int = 2
    num_query_tokens: int = 16
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    embed_dim: int = 64  # image_text_hidden_size (ITC space)
    n_train: int = 10000
    batch: int = 32
    vision_steps: int = 1000
    lm_steps: int = 1500
    qformer_steps: int = 1500
    bridge_steps: int = 1600
    lr: float = 1e-3  # the vision stage uses 2 lr
    seed: int = 0


STAGES = ("vision", "lm", "qformer", "bridge")


# --- configs and files

def vision_config(r: Recipe):
    return dict(hidden_size=r.vision_hidden, intermediate_size=4 * r.vision_hidden, num_hidden_layers=r.vision_layers,
                num_attention_heads=r.heads, image_size=r.image_size, patch_size=r.patch_size)


def qformer_config(r: Recipe, vocab_size, text_input):
    return dict(vocab_size=vocab_size, hidden_size=r.qformer_hidden, intermediate_size=4 * r.qformer_hidden,
                num_hidden_layers=r.qformer_layers, num_attention_heads=r.heads, max_position_embeddings=64,
                cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                use_qformer_text_input=text_input)


def text_config(r: Recipe, tok):
    return dict(model_type="opt", vocab_size=len(tok), hidden_size=r.text_hidden, word_embed_proj_dim=r.text_hidden,
                num_hidden_layers=r.text_layers, num_attention_heads=r.heads, ffn_dim=4 * r.text_hidden,
                max_position_embeddings=128, dropout=0.0, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("\u010a"))  # "\n" byte-level


def processors(work: Path, r: Recipe):
    """(OPT processor, BERT processor), the tokenizers trained on the world's corpus once per work dir."""
    tok_dir = work / "tokenizers"
    if not (tok_dir / "bert" / "tokenizer.json").exists():
        texts = list(world.corpus())
        train_opt_tokenizer(texts, tok_dir / "opt")
        train_bert_tokenizer(texts, tok_dir / "bert")
    image = BlipImageProcessor(size={"height": r.image_size, "width": r.image_size})
    opt = Blip2Tokenizer.from_pretrained(tok_dir / "opt")
    opt.padding_side = "left"  # batched generation continues every row from its last real token
    return (Blip2Processor(image, opt, r.num_query_tokens),
            Blip2Processor(image, Blip2Tokenizer.from_pretrained(tok_dir / "bert")))


def init_weights(model, std=0.02):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.split(".")[-1] in ("query_tokens", "class_embedding", "position_embedding"):
            nn.init.normal_(p, std=std)
    return model


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- the loop

def train(module, loss_fn, steps, lr, desc):
    """AdamW with linear warm-up and cosine decay; loss_fn(step) -> (loss, dict of numbers to show).
    Returns the loss of every step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    history = []
    module.train()
    bar = tqdm(range(steps), desc=desc, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, logs = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}", **{k: f"{v:.3f}" for k, v in logs.items()})
    module.eval()
    return history


def batches(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(n, (size,), generator=g)


@torch.no_grad()
def vision_features(vision, images, batch=500):
    """Frozen image-encoder outputs for uint8 images: (N, 1 + patches, D)."""
    return torch.cat([vision(data.pixels(images[i:i + batch])).last_hidden_state for i in range(0, len(images), batch)])


# --- stage 0: the image encoder and the language model on their own

def train_vision(work: Path, r: Recipe):
    torch.manual_seed(r.seed)
    scenes, images = data.load_split("train", r.n_train, r.image_size, r.seed)
    labels = data.cell_labels(scenes)
    pool = data.cell_pooling(r.image_size // r.patch_size)
    vision = init_weights(Blip2VisionModel(Blip2Config.from_dict({"vision_config": vision_config(r)}).vision_config))
    head = nn.Linear(r.vision_hidden, len(data.CELL_CLASSES) + len(world.COLORS) + len(world.SIZES))
    init_weights(head)
    model = nn.ModuleDict({"vision": vision, "head": head})
    draw = batches(r.n_train, r.batch, r.seed)
    splits = (len(data.CELL_CLASSES), len(world.COLORS), len(world.SIZES))

    def loss_fn(step):
        idx = draw()
        h = vision(data.pixels(images[idx.numpy()])).last_hidden_state[:, 1:]  # (B, N, D) patch tokens
        logits = head(pool @ h).split(splits, dim=-1)  # per cell: the mean of its patches
        y = labels[idx]
        parts = [nn.functional.cross_entropy(lg.flatten(0, 1), y[..., k].flatten()) for k, lg in enumerate(logits)]
        acc = (logits[0].argmax(-1) == y[..., 0]).float().mean().item()
        return sum(parts), {"shape_acc": acc}

    history = train(model, loss_fn, r.vision_steps, 2 * r.lr, "stage 0: vision")
    save_file(vision.state_dict(), work / "vision.safetensors")
    return history


def train_lm(work: Path, r: Recipe):
    torch.manual_seed(r.seed)
    opt_proc, _ = processors(work, r)
    text = data.OptText(opt_proc.tokenizer)
    scenes = world.make_split("train", r.n_train, r.seed)
    lm = init_weights(OPTForCausalLM(OPTConfig.from_dict(text_config(r, opt_proc.tokenizer))))
    lm.tie_weights()
    draw = batches(len(scenes), r.batch, r.seed + 1)

    def loss_fn(step):
        rng = data.rng_for(r.seed, step)
        input_ids, mask, labels = text.lm_batch([data.lm_text(scenes[i], rng) for i in draw().tolist()])
        return lm(input_ids=input_ids, attention_mask=mask, labels=labels).loss, {}

    history = train(lm, loss_fn, r.lm_steps, r.lr, "stage 0: language model")
    save_file({k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}, work / "lm.safetensors")
    return history


# --- stage 1: the Q-Former against the frozen image encoder

def retrieval_model(work: Path, r: Recipe, bert_tok):
    config = Blip2Config.from_dict({"vision_config": vision_config(r),
                                    "qformer_config": qformer_config(r, len(bert_tok), True),
                                    "num_query_tokens": r.num_query_tokens, "image_text_hidden_size": r.embed_dim})
    model = init_weights(Blip2ForImageTextRetrieval(config))
    model.vision_model.load_state_dict(load_file(work / "vision.safetensors"))
    freeze(model.vision_model)
    return model


def train_qformer(work: Path, out: Path, r: Recipe):
    torch.manual_seed(r.seed)
    _, bert_proc = processors(work, r)
    tok = bert_proc.tokenizer
    model = retrieval_model(work, r, tok)
    scenes, images = data.load_split("train", r.n_train, r.image_size, r.seed)
    feats = vision_features(model.vision_model, images)
    captions = [s.caption() for s in scenes]
    q = r.num_query_tokens
    temp = nn.Parameter(torch.tensor(0.07))
    itg_head = init_weights(nn.Linear(r.qformer_hidden, len(tok)))  # training only, as the real checkpoints
    trainable = nn.ModuleDict({"model": model, "itg_head": itg_head})
    trainable.register_parameter("temp", temp)
    draw = batches(len(scenes), r.batch, r.seed + 2)
    g = torch.Generator().manual_seed(r.seed + 3)
    dec = tok.convert_tokens_to_ids("[DEC]")

    def loss_fn(step):
        idx = draw().tolist()
        rng = data.rng_for(r.seed, step)
        img = feats[idx]
        texts = [captions[i] for i in idx]
        ids, mask = data.bert_batch(tok, texts)
        same = torch.tensor([[a == b for b in texts] for a in texts])
        # ITC: the best query against the text [CLS], learned temperature
        image_feats = model.itc_image_embeds(img)
        text_feats, _ = model.itc_text_embeds(ids, mask)
        itc, sim = losses.itc_loss(image_feats, text_feats, temp.clamp(0.001, 0.5), same)
        # ITM: positives; negatives mined from the ITC similarities (a text for the first half of the images, an
        # image for the second half of the texts); the world's one-attribute hard negatives
        neg_text, neg_image = losses.mine_negatives(sim, same, g)
        h = len(idx) // 2
        image_of = torch.arange(len(idx))
        text_of = torch.cat([neg_text[:h], image_of[h:]])
        hard_ids, hard_mask = data.bert_batch(tok, [world.hard_negative_caption(scenes[i], rng) for i in idx])
        t = max(ids.shape[1], hard_ids.shape[1])
        pad = lambda x: nn.functional.pad(x, (0, t - x.shape[1]))
        itm_ids = torch.cat([pad(ids), pad(ids[text_of]), pad(hard_ids)])
        itm_mask = torch.cat([pad(mask), pad(mask[text_of]), pad(hard_mask)])
        itm_img = torch.cat([img, img[torch.cat([image_of[:h], neg_image[h:]])], img])
        itm_logits, _ = model.itm_logits(itm_img, itm_ids, itm_mask)
        labels = torch.tensor([1] * len(idx) + [0] * 2 * len(idx))
        itm = losses.itm_loss(itm_logits, labels)
        # ITG: [DEC] caption, causal over the text, queries visible to the text only
        dec_ids = ids.clone()
        dec_ids[:, 0] = dec
        x = model.embeddings(dec_ids, query_embeds=model.query_tokens.expand(len(idx), -1, -1))
        h = model.qformer(x, query_length=q, attention_mask=losses.itg_mask(mask, q), encoder_hidden_states=img)
        itg = losses.itg_loss(itg_head(h.last_hidden_state[:, q:]), dec_ids, mask)
        itm_acc = (itm_logits.argmax(1) == labels).float().mean().item()
        return itc + itm + itg, {"itc": itc.item(), "itm": itm.item(), "itg": itg.item(), "itm_acc": itm_acc}

    history = train(trainable, loss_fn, r.qformer_steps, r.lr, "stage 1: Q-Former (ITC+ITM+ITG)")
    save(model, bert_proc, out / "blip2-tiny-itm")
    return history


# --- stage 2: the Q-Former prompts the frozen language model

def generation_model(work: Path, out: Path, r: Recipe, opt_tok):
    itm = Blip2ForImageTextRetrieval.from_pretrained(out / "blip2-tiny-itm")
    config = Blip2Config.from_dict({"vision_config": vision_config(r),
                                    "qformer_config": qformer_config(r, itm.config.qformer_config.vocab_size, False),
                                    "text_config": text_config(r, opt_tok), "num_query_tokens": r.num_query_tokens,
                                    "image_text_hidden_size": r.embed_dim,
                                    "image_token_index": opt_tok.convert_tokens_to_ids("<image>")})
    model = init_weights(Blip2ForConditionalGeneration(config))
    model.vision_model.load_state_dict(itm.vision_model.state_dict())
    model.query_tokens.data.copy_(itm.query_tokens.data)
    text_ffn = re.compile(r"layer\.\d+\.(intermediate|output)\.")  # the text side, absent here
    model.qformer.load_state_dict({k: v for k, v in itm.qformer.state_dict().items() if not text_ffn.search(k)})
    missing, unexpected = model.language_model.load_state_dict(load_file(work / "lm.safetensors"), strict=False)
    if missing != ["lm_head.weight"] or unexpected:  # lm_head is tied to the embeddings, stored once
        raise RuntimeError(f"lm.safetensors: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    freeze(model.vision_model)
    freeze(model.language_model)
    return model


def train_bridge(work: Path, out: Path, r: Recipe):
    torch.manual_seed(r.seed)
    opt_proc, _ = processors(work, r)
    text = data.OptText(opt_proc.tokenizer)
    model = generation_model(work, out, r, opt_proc.tokenizer)
    scenes, images = data.load_split("train", r.n_train, r.image_size, r.seed)
    feats = vision_features(model.vision_model, images)
    draw = batches(len(scenes), r.batch, r.seed + 4)

    def loss_fn(step):
        idx = draw().tolist()
        rng = data.rng_for(r.seed, step)
        input_ids, mask, labels = text.vlm_batch([data.sample_pair(scenes[i], rng) for i in idx], r.num_query_tokens)
        query_embeds = model.language_projection(model.query_features(feats[idx]).last_hidden_state)
        embeds, mask = model.merge_image_tokens(query_embeds, input_ids, mask)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        return causal_lm_loss(logits, labels), {}

    history = train(model, loss_fn, r.bridge_steps, r.lr, "stage 2: Q-Former -> frozen OPT (LM loss)")
    save(model, opt_proc, out / "blip2-tiny")
    return history


def save(model, processor, path: Path):
    model.save_pretrained(path)
    processor.save_pretrained(path)


def run(stages, work: Path, out: Path, r: Recipe):
    """Run the named stages in order; returns {stage: (seconds, loss history)}."""
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    fns = {"vision": lambda: train_vision(work, r), "lm": lambda: train_lm(work, r),
           "qformer": lambda: train_qformer(work, out, r), "bridge": lambda: train_bridge(work, out, r)}
    report = {}
    for stage in stages:
        t0 = time.time()
        history = fns[stage]()
        report[stage] = (time.time() - t0, history)
        print(f"{stage}: {report[stage][0]:.0f} s, loss {np.mean(history[:10]):.3f} -> {np.mean(history[-10:]):.3f}")
    return report
