"""Training of the embedded tiny models: the tiny LLaVA (``tiny_llava``, run by ``dop stage=train``)
and the CLIP text tower aligned with its vision tower (``clip_text``, for TRIM / CDPruner).

May import model access and the concepts; no other algorithm package.
"""
