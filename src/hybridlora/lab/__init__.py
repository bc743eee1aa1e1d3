"""The architecture lab: matched sequential / parallel hybrids from one spec, pretrained and probed.

``spec`` (YAML -> ArchSpec), ``solve`` (width for a parameter target -> LabConfig), ``model`` (the transformers
model, registered with the Auto classes on import), ``pretrain``, ``probes``, ``efficiency``, ``report``, ``cli``.
"""
from .spec import ArchSpec, SpecError, load_spec, spec_from_dict, variants  # noqa: F401
