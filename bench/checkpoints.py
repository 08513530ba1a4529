"""The Salesforce BLIP-2 checkpoints' exact architectures, as random-weight checkpoints written shard by shard.

hub_config(name) is the checkpoint's Hub config.json (its architecture fields: every shape a weight has, the token
ids generation uses). Sources: the Hub's config.json files (image_token_index, the OPT vocabulary of 50304 after
the image token was added, eos 50118 = "\\n" for OPT) and transformers' conversion script
(convert_blip_2_original_to_pytorch.py: the -coco checkpoints' ViT-g runs at 364 px, Flan-T5 with
dense_act_fn="gelu", the retrieval Q-Former's vocabulary of 30523 with its text input). The vision tower is ViT-g/14
(39 x 1408) in every one, the Q-Former 12 x 768 with 32 queries.

write_checkpoint(name, path): random N(0, 0.02) weights (layer norms 1, biases 0) in bf16 safetensors shards of
2 GB in the Hugging Face layout, never more than one shard in memory, into path.tmp renamed when complete.
Loadable by blip2 and by transformers alike. weights=False writes the same files with every tensor's bytes left as
a hole (a sparse file: headers only on disk), for what reads only the headers (blip2.memory_report, the app's
memory check).
"""

import json
import math
import os

SHARD = 2 * 10**9
VISION = {"dropout": 0.0, "initializer_factor": 1.0, "model_type": "blip_2_vision_model", "num_channels": 3,
          "projection_dim": 512}
QFORMER = {"classifier_dropout": None, "model_type": "blip_2_qformer"}
OPT = {"activation_dropout": 0.0, "architectures": ["OPTForCausalLM"], "eos_token_id": 50118, "model_type": "opt",
       "num_attention_heads": 32, "num_hidden_layers": 32, "prefix": "</s>", "torch_dtype": "float16",
       "vocab_size": 50304}
TEXT = {
    "opt-2.7b": {**OPT, "_name_or_path": "facebook/opt-2.7b", "ffn_dim": 10240, "hidden_size": 2560,
                 "word_embed_proj_dim": 2560},
    "opt-6.7b": {**OPT, "_name_or_path": "facebook/opt-6.7b", "ffn_dim": 16384, "hidden_size": 4096,
                 "word_embed_proj_dim": 4096},
    "flan-t5-xl": {"_name_or_path": "google/flan-t5-xl", "architectures": ["T5ForConditionalGeneration"],
                   "bos_token_id": 1, "d_ff": 5120, "d_kv": 64, "d_model": 2048, "decoder_start_token_id": 0,
                   "dense_act_fn": "gelu", "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
                   "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                   "num_decoder_layers": 24, "num_heads": 32, "num_layers": 24, "pad_token_id": 0,
                   "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32128},
}
TEXT["flan-t5-xxl"] = {**TEXT["flan-t5-xl"], "_name_or_path": "google/flan-t5-xxl", "d_ff": 10240, "d_model": 4096,
                       "num_heads": 64}
IMAGE_TOKEN = {"opt": 50265, "t5": 32100}
MODELS = ("opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl", "opt-2.7b-coco", "opt-6.7b-coco", "flan-t5-xl-coco",
          "itm-vit-g", "itm-vit-g-coco")


def hub_config(name: str) -> dict:
    """Salesforce/blip2-{name}'s config.json (the fields that fix the architecture and generation's token ids)."""
    if name not in MODELS:
        raise ValueError(f"unknown checkpoint {name!r}: choose from {', '.join(MODELS)}")
    base = name.removesuffix("-coco")
    vision = {**VISION, **({"image_size": 364} if name.endswith("-coco") else {})}
    common = {"image_text_hidden_size": 256, "initializer_factor": 1.0, "initializer_range": 0.02,
              "model_type": "blip-2", "num_query_tokens": 32, "vision_config": vision}
    if base == "itm-vit-g":
        return {**common, "architectures": ["Blip2ForImageTextRetrieval"],
                "qformer_config": {**QFORMER, "use_qformer_text_input": True, "vocab_size": 30523}}
    text = TEXT[base]
    return {**common, "architectures": ["Blip2ForConditionalGeneration"], "qformer_config": QFORMER,
            "text_config": text, "image_token_index": IMAGE_TOKEN[text["model_type"]],
            "use_decoder_only_language_model": text["model_type"] == "opt"}


def is_written(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.safetensors.index.json"))


def write_checkpoint(name: str, path: str, weights: bool = True) -> str:
    """Write Salesforce/blip2-{name}'s architecture with random weights once (into path.tmp, renamed when
    complete), one shard at a time; weights=False: headers only (sparse shards). Returns path."""
    if is_written(path):
        return path
    import torch
    import transformers
    from safetensors.torch import save_file

    config = hub_config(name)
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        meta = cls(transformers.Blip2Config.from_dict(config))
    # named_parameters lists a tied weight once (OPT's lm_head is its token table, T5's embed_tokens its shared)
    shapes = {k: tuple(v.shape) for k, v in meta.named_parameters()}
    shapes |= {k: tuple(v.shape) for k, v in meta.named_buffers() if k in meta.state_dict()}
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > SHARD:
            groups, size = groups + [[]], 0
        groups[-1].append(key)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        if not weights:
            weight_map |= dict.fromkeys(keys, shard)
            total += write_header(os.path.join(tmp, shard), {k: shapes[k] for k in keys})
            continue
        tensors = {}
        for key in keys:
            t = torch.empty(shapes[key], dtype=torch.bfloat16)
            if key.endswith("bias"):
                t.zero_()
            elif "norm" in key.lower() and key.endswith("weight"):
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=gen)
            tensors[key] = t
            weight_map[key] = shard
            total += t.numel() * 2
        save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {shard}", flush=True)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": "bfloat16"}, f, indent=1)
    os.rename(tmp, path)
    return path


def write_header(file: str, shapes: dict) -> int:
    """A bf16 safetensors file whose tensors' bytes are a hole (sparse): the header, then the data's size. Returns
    the data's bytes."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return offset
