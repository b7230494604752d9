"""The model side: where a model comes from, loading it, attention, packing, LoRA and FLOPs.

`fetch` (embedded models, `model.path` resolution; ``python -m ssrengine.models fetch NAME``),
`files` (checks of model and tokenizer files), `loading` (tokenizer and model, and
`hidden_and_head`, the one boundary to transformers models), `layers` (the decoder blocks),
`attention` (which attention a run uses, `sdpa_varlen`), `precision` (the dtype a model
computes in on a GPU, TF32), `packing` (bins of examples in one row), `lora` (PEFT adapters)
and `flops` (model FLOPs and MFU).
"""
