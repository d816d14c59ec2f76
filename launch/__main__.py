"""``python -m launch STAGE [flags]``: one entry point the per-accelerator scripts share.

STAGE is ``pipeline`` (extract -> train -> discover -> report) or one of its stages; the flags
are that stage's own (``python -m launch train --help``).
"""

from __future__ import annotations

import runpy
import sys

MODULES = {
    "pipeline": "launch.pipeline",
    "prompts": "extractor.prompts",
    "extract": "extractor.extract",
    "train": "jax_sae.train",
    "discover": "discovery.discover",
    "report": "discovery.report",
    "export": "jax_sae.export",
    "evaluate": "extractor.evaluate",
    "steer": "extractor.steer",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in MODULES:
        sys.exit(f"usage: python -m launch {{{'|'.join(MODULES)}}} [flags]  (--help after a stage shows its flags)")
    module = MODULES[sys.argv[1]]
    sys.argv = [f"python -m {module}", *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
