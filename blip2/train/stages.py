"""The BLIP-2 recipe at small scale, one function per stage.

0. `vision`: a ViT learns the world on its own: every patch token predicts the shape (or empty), colour and
   size of the object in its 3x3 cell AND the cell's index, so that what and where both survive in the tokens
   (the Q-Former's cross-attention is permutation-invariant over them).
   `lm`: an OPT learns the world's language (captions, prompts, answers after a scene description).
   Both are frozen from here on, as the pre-trained image encoder and LLM of the paper.
1. `qformer`: the Q-Former learns from the frozen image encoder with ITC + ITM (hard negatives, after a warm-up
   on random ones; class-balanced) + ITG; held-out ITM AUC and ITC recall are printed every `check_every` steps.
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
from blip2.image_processing import BlipImageProcessor
from blip2.opt import OPTForCausalLM, causal_lm_loss
from blip2.processing import Blip2Processor
from blip2.tokenizer import Blip2Tokenizer
from blip2.train import data, losses, world
from blip2.train.tokenizer_training import train_bert_tokenizer, train_opt_tokenizer


@dataclass
class Recipe:
    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    qformer_hidden: int = 128
    qformer_layers: int = 4
    num_query_tokens: int = 32  # as the real checkpoints; 16 cannot hold a 3-object description (~25 tokens)
    text_hidden: int = 128
    text_layers: int = 4  # 3 hops (bind an attribute to its object, find the question's object, read) + 1
    heads: int = 4
    embed_dim: int = 64  # image_text_hidden_size (ITC space)
    n_train: int = 10000
    n_val: int = 300  # held-out scenes of the checks printed while training
    batch: int = 32
    vision_steps: int = 2000
    lm_steps: int = 8000  # held-out answers right given the true description: 94.6% after 3000, 99.7% after 8000
    qformer_steps: int = 5000  # test ITM AUC 0.975 after a 3500-step schedule, 0.996 after 5000
    bridge_steps: int = 8000
    lr: float = 1e-3  # the vision stage uses 2 lr
    itm_warmup: float = 0.2  # fraction of stage 1 with random (not ITC-mined) ITM negatives
    itm_head_lr_scale: float = 3.0
    bridge_lr: float = 5e-4  # 2e-3 undoes stage 1: the Q-Former forgets what it learned about the image
    lm_lr: float = 2e-3
    lm_aux_layer: int = 2  # the language model's deep supervision reads the hidden states after this many layers
    lm_captions: float = 0.2  # share of captions in the LM's texts (copying the context is easy; answering is not)
    lm_photo: float = 0.4  # share of "a photo of" among them
    turns: int = 4  # questions per chat text at most (stages 0 and 2)
    bridge_captions: float = 0.45  # share of captions in stage 2 (the empty prompt has no other cue)
    check_every: int = 300  # validation every so many steps (the language model: 5x as many)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.lm_aux_layer <= self.text_layers:
            raise ValueError(f"lm_aux_layer must be a layer of the language model (1..{self.text_layers}), "
                             f"not {self.lm_aux_layer}")


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

def train(module, loss_fn, steps, lr, desc, lr_scale=None, every=0, check=None):
    """AdamW with linear warm-up and cosine decay; loss_fn(step) -> (loss, dict of numbers to show).
    lr_scale: {parameter name prefix: lr multiplier}. check(): a validation, printed every `every` steps
    and at the end. Returns the loss of every step."""
    lr_scale = lr_scale or {}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    def scale_of(n):
        return next((v for k, v in lr_scale.items() if n.startswith(k)), 1.0)
    groups = {}
    for n, p in named:
        groups.setdefault(scale_of(n), []).append(p)
    params = [p for _, p in named]
    opt = torch.optim.AdamW([{"params": ps, "scale": sc} for sc, ps in groups.items()], lr=lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    warmup = max(1, steps // 20)
    history = []
    module.train()
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, logs = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}", **{k: f"{v:.3f}" for k, v in logs.items()})
        if check and ((every and (step + 1) % every == 0) or step + 1 == steps):
            module.eval()
            with torch.no_grad():
                tqdm.write(f"{desc} step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in check().items()))
            module.train()
    module.eval()
    return history


def batches(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(n, (size,), generator=g)


@torch.no_grad()
def vision_features(vision, images, batch=500):
    """Frozen image-encoder outputs for uint8 images: (N, 1 + patches, D)."""
    return torch.cat([vision(data.pixels(images[i:i + batch])).last_hidden_state for i in range(0, len(images), batch)])


def exact(logits, labels):
    """(B,) whether the greedy next-token prediction is right at every labelled position (teacher forcing)."""
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    return ((pred == target) | (target == -100)).all(1).tolist()


def per_kind(right, rows, batch=200):
    """{kind: exact-match rate, "all": overall} of right(rows) over (scene index, (prompt, target), kind) rows."""
    ok = np.array([x for k in range(0, len(rows), batch) for x in right(rows[k:k + batch])])
    kinds = np.array([kind for _, _, kind in rows])
    return {kind: ok[kinds == kind].mean() for kind in dict.fromkeys(kinds)} | {"all": ok.mean()}


# --- stage 0: the image encoder and the language model on their own

def train_vision(work: Path, r: Recipe):
    """Per patch token (not per pooled cell): each patch predicts the shape/empty, colour and size of what covers
    its 3x3 cell and the cell index itself, so WHAT and WHERE both survive in the tokens the Q-Former reads
    (its cross-attention is permutation-invariant over them)."""
    torch.manual_seed(r.seed)
    scenes, images = data.load_split("train", r.n_train, r.image_size, r.seed)
    grid = r.image_size // r.patch_size
    labels = data.patch_labels(scenes, grid)
    vision = init_weights(Blip2VisionModel(Blip2Config.from_dict({"vision_config": vision_config(r)}).vision_config))
    splits = (len(data.CELL_CLASSES), len(world.COLORS), len(world.SIZES), 9)
    head = nn.Linear(r.vision_hidden, sum(splits))
    init_weights(head)
    model = nn.ModuleDict({"vision": vision, "head": head})
    draw = batches(r.n_train, r.batch, r.seed)

    def loss_fn(step):
        idx = draw()
        h = vision(data.pixels(images[idx.numpy()])).last_hidden_state[:, 1:]  # (B, P, D) patch tokens
        logits = head(h).split(splits, dim=-1)
        y = labels[idx]
        loss = sum(nn.functional.cross_entropy(lg.flatten(0, 1), y[..., k].flatten()) for k, lg in enumerate(logits))
        return loss, {}

    val_scenes, val_images = data.load_split("val", r.n_val, r.image_size, r.seed)
    val_labels = data.patch_labels(val_scenes, grid)

    def check():  # held-out per-patch accuracy of each target (colour and size where a shape is)
        logits = head(vision_features(vision, val_images)[:, 1:]).split(splits, dim=-1)
        right = [(lg.argmax(-1) == val_labels[..., k])[val_labels[..., k] != -100].float().mean().item()
                 for k, lg in enumerate(logits)]
        return dict(zip(("shape", "color", "size", "cell"), right))

    history = train(model, loss_fn, r.vision_steps, 2 * r.lr, "stage 0: vision", every=r.check_every, check=check)
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
    val_scenes = world.make_split("val", r.n_val, r.seed)
    val_rows = data.check_rows(val_scenes, data.rng_for(r.seed, "val"))

    def lm_check():  # can the LM read its context? teacher-forced exact match after the true caption, per kind
        def right(rows):
            input_ids, mask, labels = text.batch([(text.tok.encode(val_scenes[i].caption(), add_special_tokens=False),
                                                   *text.encode([pair])) for i, pair, _ in rows])
            return exact(lm(input_ids=input_ids, attention_mask=mask).logits, labels)
        return per_kind(right, val_rows)

    # Deep supervision (training only, dropped afterwards): linear heads read, after `lm_aux_layer` layers, all
    # four attributes of each object at the end of its phrase in the context, and at a question's ":" what the
    # question names its object by. Without it the lookup "which object does the question name?" never forms at
    # this size and compute (python -m blip2.train.probe: chance with 2-3 objects after 3000 steps): each half of
    # the circuit gets no gradient until the other half exists. With both halves taught, the lookup is learned.
    heads = init_weights(losses.attribute_heads(r.text_hidden))
    trainable = nn.ModuleDict({"lm": lm, "heads": heads})

    def loss_fn(step):
        rng = data.rng_for(r.seed, step)
        picked = [scenes[i] for i in draw().tolist()]
        texts = [data.lm_text(s, rng, r.lm_captions, r.lm_photo, r.turns) for s in picked]
        input_ids, mask, labels = text.lm_batch(texts)
        out = lm(input_ids=input_ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        aux = losses.attribute_loss(heads, out.hidden_states[r.lm_aux_layer], text.attribute_targets(texts, picked))
        return out.loss + aux, {"lm": out.loss.item(), "aux": aux.item()}

    history = train(trainable, loss_fn, r.lm_steps, r.lm_lr, "stage 0: language model", every=r.check_every * 5,
                    check=lm_check)
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

    warm = int(r.itm_warmup * r.qformer_steps)  # ITM warm-up: random in-batch negatives before ITC-mined ones

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
        # image for the second half of the texts), uniform in-batch ones during the warm-up; the world's
        # one-attribute hard negatives
        neg_text, neg_image = losses.mine_negatives(sim if step >= warm else torch.zeros_like(sim), same, g)
        n = len(idx) // 2  # ITM on half the batch (CPU budget): n positives, n mined, n hard negatives
        h = n // 2
        image_of = torch.arange(n)
        text_of = torch.cat([neg_text[:h], image_of[h:]])
        hard_ids, hard_mask = data.bert_batch(tok, [world.hard_negative_caption(scenes[i], rng) for i in idx[:n]])
        t = max(ids.shape[1], hard_ids.shape[1])
        def pad(x):
            return nn.functional.pad(x, (0, t - x.shape[1]))
        itm_ids = torch.cat([pad(ids[:n]), pad(ids[text_of]), pad(hard_ids)])
        itm_mask = torch.cat([pad(mask[:n]), pad(mask[text_of]), pad(hard_mask)])
        itm_img = torch.cat([img[:n], img[torch.cat([image_of[:h], neg_image[h:n]])], img[:n]])
        itm_logits, _ = model.itm_logits(itm_img, itm_ids, itm_mask)
        labels = torch.tensor([1] * n + [0] * 2 * n)
        itm = losses.itm_loss(itm_logits, labels, weight=torch.tensor([1.0, 2.0]))  # balanced: no prior to sit at
        # ITG: [DEC] caption, causal over the text, queries visible to the text only
        dec_ids = ids.clone()
        dec_ids[:, 0] = dec
        x = model.embeddings(dec_ids, query_embeds=model.query_tokens.expand(len(idx), -1, -1))
        h = model.qformer(x, query_length=q, attention_mask=losses.itg_mask(mask, q), encoder_hidden_states=img)
        itg = losses.itg_loss(itg_head(h.last_hidden_state[:, q:]), dec_ids, mask)
        itm_acc = (itm_logits.argmax(1) == labels).float().mean().item()
        return itc + itm + itg, {"itc": itc.item(), "itm": itm.item(), "itg": itg.item(), "itm_acc": itm_acc}

    val_scenes, val_images = data.load_split("val", r.n_val, r.image_size, r.seed)
    val_feats = vision_features(model.vision_model, val_images)

    def check():  # held-out ITM: true caption vs one-attribute hard negative; ITC text->image R@1 among 300
        vrng = data.rng_for(r.seed, "val")
        pos_ids, pos_mask = data.bert_batch(tok, [s.caption() for s in val_scenes])
        neg_ids, neg_mask = data.bert_batch(tok, [world.hard_negative_caption(s, vrng) for s in val_scenes])
        pos = model.itm_logits(val_feats, pos_ids, pos_mask)[0].softmax(1)[:, 1]
        neg = model.itm_logits(val_feats, neg_ids, neg_mask)[0].softmax(1)[:, 1]
        auc = ((pos[:, None] > neg[None, :]).float().mean()).item()
        sim = torch.einsum("iqe,te->iqt", model.itc_image_embeds(val_feats),
                           model.itc_text_embeds(pos_ids, pos_mask)[0]).amax(1)
        t2i = (sim.argmax(0) == torch.arange(len(val_scenes))).float().mean().item()
        return {"itm_acc": ((pos > 0.5).float().mean() + (neg < 0.5).float().mean()).item() / 2, "itm_auc": auc,
                "itc_t2i_r@1_all_val": t2i}

    history = train(trainable, loss_fn, r.qformer_steps, r.lr, "stage 1: Q-Former (ITC+ITM+ITG)",
                    lr_scale={"model.itm_head": r.itm_head_lr_scale}, every=r.check_every, check=check)
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
        texts = [data.sample_text(scenes[i], rng, r.bridge_captions, turns=r.turns) for i in idx]
        input_ids, mask, labels = text.vlm_batch(texts, r.num_query_tokens)
        query_embeds = model.language_projection(model.query_features(feats[idx]).last_hidden_state)
        embeds, mask = model.merge_image_tokens(query_embeds, input_ids, mask)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        return causal_lm_loss(logits, labels), {}

    val_scenes, val_images = data.load_split("val", r.n_val, r.image_size, r.seed)
    val_feats = vision_features(model.vision_model, val_images)
    val_rows = data.check_rows(val_scenes, data.rng_for(r.seed, "val"))

    def check():  # teacher-forced exact match of the whole target (caption or answer), per kind, held-out scenes
        def right(rows):
            input_ids, mask, labels = text.vlm_batch([[pair] for _, pair, _ in rows], r.num_query_tokens)
            query_embeds = model.language_projection(model.query_features(val_feats[[i for i, _, _ in rows]])
                                                     .last_hidden_state)
            embeds, mask = model.merge_image_tokens(query_embeds, input_ids, mask)
            return exact(model.language_model(inputs_embeds=embeds, attention_mask=mask).logits, labels)
        return per_kind(right, val_rows)

    history = train(model, loss_fn, r.bridge_steps, r.bridge_lr, "stage 2: Q-Former -> frozen OPT (LM loss)",
                    every=r.check_every, check=check)
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
