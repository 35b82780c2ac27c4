"""Committed training checkpoints as the export and a resume read them, below both training/ and export/ (neither
imports the other): training/checkpoint.py writes them.

read.py     find a checkpoint, verify it against its manifest, read its trainer state; the manifest's hashes
zero.py     the engine's files: ZeRO-1/2/3 shards (or the plain PyTorch engine's) read lazily, memory-mapped
ranks.py    this process's rank, the number of ranks, a gather from every rank
"""
