"""The planner on each family's full-size architecture: the smallest peak it reaches and its plan under a budget.

    python bench/planner_families.py            # SD 1.5, SD 2.x, SDXL base at their native sizes, fp16

Sizes come from `leansd.engine.memory.reference_sizes` (the published architectures built on the
meta device: no weights, no memory); activations are the planner's own estimates (calibrated in
bench/activations.py). "efficient" is flash / memory-efficient SDPA (CUDA), "math" materialised
scores. Prints markdown; never asserts.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table  # noqa: E402

GiB = 2**30
TARGETS = (  # (family, side, budget in GiB): the issue's targets and SD 1.5's usual one
    ("sd1", 512, 1.0),
    ("sd2", 768, 2.0),
    ("sdxl", 1024, 4.0),
)


def main() -> int:
    from leansd.engine.memory import reference_sizes
    from leansd.engine.planner import MARGIN, PlanRequest, format_size, plan_memory
    from leansd.errors import InvalidRequestError
    from leansd.models.family import ModelFamily

    rows = []
    for family, side, budget_gib in TARGETS:
        sizes = reference_sizes(ModelFamily(family), dtype_bytes=2)
        for efficient in (True, False):
            request = PlanRequest(width=side, height=side, efficient_attention=efficient)
            resident = plan_memory(sizes, request, None)
            budget = int(budget_gib * GiB)
            try:
                plan = plan_memory(sizes, request, budget)
                fits = f"{plan.placement}, peak {format_size(plan.peak)}"
            except InvalidRequestError:
                fits = "does not fit"
            # The lowest --vram that plans (the minimum plus the planner's 10 % margin) and its plan there.
            lowest = math.ceil(resident.minimum / (1 - MARGIN) / 2**20) * 2**20
            floor = plan_memory(sizes, request, lowest)
            rows.append([ModelFamily(family).label, f"{side}x{side}", "efficient" if efficient else "math",
                         format_size(sizes.unet), format_size(sizes.text_encoder), format_size(resident.peak),
                         format_size(resident.minimum), f"{budget_gib:g}G: {fits}",
                         f"{format_size(lowest)}: {floor.placement}"])
    print("## The planner on full-size architectures (bench/planner_families.py), fp16, batch 1\n")
    headers = ["family", "size", "attention", "UNet", "text encoders", "all resident", "minimum", "under budget",
               "lowest --vram"]
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
