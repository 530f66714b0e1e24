"""divaware: divergence-aware training with automatic subgroup mitigation for fair breast tumour
segmentation in DCE-MRI (MAMA-MIA).

Data flows one way through the modules; none imports one further down this list:
``cohort``/``synthetic`` -> ``subgroups`` -> ``weighting`` -> ``data``/``model``/``losses`` -> ``train``
-> ``predict`` -> ``metrics`` -> ``evaluate`` -> ``plots``/``widgets`` -> ``pipeline`` -> ``cli``.
Submodules are imported lazily so that ``import divaware`` stays cheap (no torch at import time).
"""

__version__ = "0.1.0"
