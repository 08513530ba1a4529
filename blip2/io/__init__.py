"""Checkpoints in the Hugging Face format, safetensors only: the I/O under every model's from_pretrained /
save_pretrained (blip2/pretrained.py). Nothing here imports a model: the model class comes in as an argument.

Loading, in order (nothing is allocated before the checkpoint is known to be complete and to fit):
1. hub.py: a local directory, or a hub id fetched into the Hugging Face cache (huggingface_hub);
2. safetensors.py: every header read and (load.py) checked against the model built on the meta device
   (missing / misshapen tensors, truncated files: a CheckpointError naming the file and key);
3. load.py: quantization swaps the language model's nn.Linear for bitsandbytes or weight-only layers (still on meta);
4. placement.py: the device map, accelerate's infer_auto_device_map for "auto" / "balanced" / "sequential", or the
   given one;
5. load.py: each tensor read from disk straight into its final dtype, then placed: on its device (quantized there
   when asked), or on disk (the offload folder, or the checkpoint itself when the dtype already matches);
6. placement.py: several devices or disk: accelerate's dispatch_model moves activations (and offloaded weights).
save.py writes config.json, generation_config.json and (sharded) safetensors.
"""
