"""dop: operation-pruning policies for multimodal LLMs (DOP).

The package is layered; every import points down (checked by import-linter, see pyproject.toml):

    cli                      the Hydra entry point ``dop``
    stages                   the only config readers: typed stage configs, one module per stage
    sweep | search | evaluation | training | report | bench | tracking     (algorithms, independent)
    engine                   front_end -> baselines -> core (gather/scatter); ``dop.engine.prune``
    models : adapters : data : divergence : clip_tokenizer                 (model access)
    flops : policy : space : budget : ops : io : results : registry        (concepts, no model code)
"""

__version__ = "0.1.0"
