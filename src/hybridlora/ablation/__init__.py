"""Component ablation (``hybridlora ablate``): remove a component, measure what breaks.

``methods`` (units from the component map and the hooks that remove them), ``plans`` (conditions),
``perplexity`` (the strided protocol), ``diagnostics`` (per-layer), ``jobs`` (one condition as a study-runner job),
``stats`` and ``report``, ``cli``. See docs/ABLATION.md.
"""
