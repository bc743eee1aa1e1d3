"""Regenerate tests/golden/component_maps.json. Review the diff by hand before committing: the golden file
is the reviewed statement of how every family's modules are classified."""
import json
from pathlib import Path

from family_fixtures import REQUIRED_MODEL_TYPES, compact_map, tiny_map

if __name__ == "__main__":
    golden = {}
    for mt in REQUIRED_MODEL_TYPES:
        cmap = tiny_map(mt)
        golden[mt] = {
            "topology": cmap.topology,
            "schedule": [[layer.kind, layer.mixers] for layer in cmap.schedule],
            "total_params": cmap.total_params,
            "modules": compact_map(cmap),
        }
    path = Path(__file__).parent / "golden" / "component_maps.json"
    path.write_text(json.dumps(golden, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}")
