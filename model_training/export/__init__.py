"""Export: DeepSpeed ZeRO checkpoints to Hugging Face model folders, streaming, on the CPU.

writer.py       writes safetensors shards one at a time, with the index transformers reads
export.py       the whole folder: weights, config, generation config, tokenizer; atomic rename at the end
hub.py          the optional upload to the Hugging Face Hub
cli.py          the export_model.py command line

The checkpoint is found and verified by model_training/checkpoints/read.py and its per-rank ZeRO-1/2/3 shards are read
lazily (memory-mapped) into tensors of any dtype by model_training/checkpoints/zero.py, which training/ shares.
"""
