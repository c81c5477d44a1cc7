"""The compression: quantise the source into a staged folder, measure it beside the source, gate it, move it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from framework.cluster import machine
from framework.compress.measure import (
    Figures,
    agreement,
    score,
    set_threads,
    time_decode,
)
from framework.compress.methods import METHODS, torchao_version
from framework.compress.plan import COMPRESS_MARKER, CompressPlan
from framework.config import RunError
from framework.model import dtype_named


class CompressError(RunError):
    """The compressed model is not good enough to keep (its perplexity past the bound), or quantised nothing."""


def quantise(plan: CompressPlan, staged: str) -> int:
    """Load the source with the method's TorchAoConfig, save it (and its tokenizer) to `staged`; gives how many
    weights came out quantised."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from framework.hf_folder import quantised_tensors

    c = plan.compress
    config = TorchAoConfig(METHODS.get(c.method).build(c.group_size))
    model = AutoModelForCausalLM.from_pretrained(plan.source, local_files_only=True, dtype=dtype_named(c.dtype),
                                                 device_map=c.device, quantization_config=config)
    model.save_pretrained(staged)
    del model
    AutoTokenizer.from_pretrained(plan.source, local_files_only=True).save_pretrained(staged)
    count = 0
    for file in Path(staged).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            count += quantised_tensors(handle.metadata())
    if count == 0:
        raise CompressError(f"compress.method={c.method}: torchao quantised none of the {plan.linear_layers} linear layers of {plan.source}")
    return count


def report(plan: CompressPlan, source: Figures, compressed: Figures, quantised: int) -> Dict[str, Any]:
    """compress_report.json: where the folder came from, how it was made, and its figures beside the source's."""
    from framework.export import EXPORT_MARKER

    c = plan.compress
    exported = plan.source / EXPORT_MARKER
    return {
        "source": str(plan.source),
        "source_export": json.loads(exported.read_text()) if exported.is_file() else None,
        "preset": c.name, "method": c.method, "group_size": c.group_size, "dtype": c.dtype, "device": c.device,
        "torchao": torchao_version(), "quantised_layers": quantised, "linear_layers": plan.linear_layers,
        "size": {"source_bytes": source.weights_bytes, "compressed_bytes": compressed.weights_bytes,
                 "ratio": round(compressed.weights_bytes / source.weights_bytes, 4)},
        "perplexity": {"data_dir": plan.data_dir, "rows": compressed.rows, "source": source.perplexity,
                       "compressed": compressed.perplexity, "ratio": round(compressed.perplexity / source.perplexity, 5),
                       "max_ratio": c.max_ppl_increase, "source_loss": source.loss, "compressed_loss": compressed.loss},
        "greedy": {**agreement(source.tokens, compressed.tokens), "max_tokens": c.max_tokens},
        "decode": {"prompts": c.prompts, "max_tokens": c.max_tokens, "torch_threads": torch.get_num_threads(),
                   "source_tokens_per_s": round(source.tokens_per_s, 2), "compressed_tokens_per_s": round(compressed.tokens_per_s, 2),
                   "ratio": round(compressed.tokens_per_s / source.tokens_per_s, 3), "machine": machine()},
    }


def gate(plan: CompressPlan, source: Figures, compressed: Figures) -> None:
    """Raise CompressError (one line naming the figures) when perplexity rose past compress.max_ppl_increase."""
    c = plan.compress
    ratio = compressed.perplexity / source.perplexity
    if not ratio <= c.max_ppl_increase:  # also catches NaN
        raise CompressError(
            f"compress.max_ppl_increase={c.max_ppl_increase}: {c.name} ({c.method}) takes validation perplexity from "
            f"{source.perplexity:.4f} to {compressed.perplexity:.4f} (×{ratio:.5f}, past the bound) on {compressed.rows} "
            f"rows of {plan.data_dir}; nothing written to {plan.output_dir}"
        )


def compress(plan: CompressPlan, source: Optional[Figures] = None) -> Dict[str, Any]:
    """Write the compressed folder the plan describes, once it passes the quality gate; gives its report.

    `source` (the source folder's figures, from `measure_source`, for a caller that compresses one folder several
    ways) is measured here when left out. Raises CompressError and leaves output_dir untouched when the gate fails.
    """
    from framework.hf_folder import quiet_progress_bars, replace_dir, share_permissions

    set_threads(plan)
    parent = os.path.dirname(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    # Written beside the target (same filesystem, so the final move is a rename) and moved only once it passes.
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(plan.output_dir)}.partial-", dir=parent)
    try:
        with quiet_progress_bars():
            quantised = quantise(plan, staged)
            compressed = score(Path(staged), plan)  # loaded back with from_pretrained, as a user would
            if source is None:
                source = score(plan.source, plan)
            gate(plan, source, compressed)  # before any timing: a model that is not kept is not worth timing
            if not source.tokens:
                time_decode(plan.source, plan, source)
            time_decode(Path(staged), plan, compressed)
        result = report(plan, source, compressed, quantised)
        with open(os.path.join(staged, COMPRESS_MARKER), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        share_permissions(staged)
        replace_dir(staged, plan.output_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(table(result, plan.output_dir), flush=True)
    track(plan, result)
    return result


def track(plan: CompressPlan, result: Dict[str, Any]) -> None:
    """tracking=mlflow: the compression as a run under the source's export run, the report's figures as metrics; its
    id in the folder's tracking.json."""
    import dataclasses

    from framework import storage, tracking
    from framework.export import EXPORT_MARKER

    ref = tracking.record_run(plan.tracking, "compress", os.path.basename(plan.output_dir),
                              {"compress": dataclasses.asdict(plan.compress)}, result,
                              parent=tracking.parent_of(str(plan.source / EXPORT_MARKER)))
    if ref is not None:
        storage.write_json(os.path.join(plan.output_dir, tracking.TRACKING_FILE), ref.as_dict())


def table(r: Dict[str, Any], output_dir: str) -> str:
    """The report as a few printed lines."""
    size, ppl, greedy, dec = r["size"], r["perplexity"], r["greedy"], r["decode"]
    mb = 1e6
    rows = [
        ("", "source", r["preset"], "ratio"),
        ("weights on disk (MB)", f"{size['source_bytes'] / mb:.2f}", f"{size['compressed_bytes'] / mb:.2f}", f"{size['ratio']:.3f}"),
        (f"val perplexity ({ppl['rows']} rows)", f"{ppl['source']:.4f}", f"{ppl['compressed']:.4f}", f"{ppl['ratio']:.5f}"),
        (f"decode tokens/s ({dec['prompts']}×{dec['max_tokens']})", f"{dec['source_tokens_per_s']:.1f}",
         f"{dec['compressed_tokens_per_s']:.1f}", f"{dec['ratio']:.3f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"compress: {r['source']} → {output_dir}: {r['method']}, {r['quantised_layers']} of {r['linear_layers']} "
             f"linear layers quantised (torchao {r['torchao']}, {r['dtype']} on {r['device']})"]
    lines += ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append(f"  greedy agreement: {greedy['identical']}/{greedy['prompts']} prompts identical, "
                 f"{greedy['token_agreement']:.1%} of the source's tokens before the first difference "
                 f"(perplexity bound ×{ppl['max_ratio']}; {dec['torch_threads']} torch threads on {dec['machine']})")
    return "\n".join(lines)
