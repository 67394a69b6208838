"""megatron_ualm: the Unified Audio Language Model (UALM) on Megatron-core.

Data flow: raw manifests -> audio shards -> tokenized IndexedDatasets -> packed batches
-> UALMModel -> distributed checkpoints -> HuggingFace export -> generation.
"""
__version__ = "0.1.0"
