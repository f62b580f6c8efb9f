"""Reference outputs of transformers' torchvision-backend Qwen2-VL image processor, for tests/test_preprocess.py.

Run as a separate process (the test starts it) because it imports torchvision, which the test process must not see:
transformers decides at import time which image-processor backend it has.

    python tests/preprocess_reference.py REF_DIR CASES_DIR OUT.safetensors

REF_DIR is a `pip install --no-deps --target` directory holding torchvision==0.29.1 and qwen-vl-utils==0.0.14 (see
.ci/run); torchvision is imported through `qzoom.evals.torchvision_shim`. CASES_DIR/cases.json lists the cases:
`{"id", "processor" (a directory holding a preprocessor_config.json), "image" (a file), "budget": [min, max],
"kind": "processor" | "prefit"}`. "processor" is `Qwen2VLImageProcessor.from_pretrained(dir)(images=[image],
size=..., return_tensors="pt")`, what `AutoProcessor(..., use_fast=True)` runs; "prefit" is the official Qwen3-VL
global view: qwen-vl-utils' `fetch_image` at the budget with `image_patch_size=patch_size`, then the processor with
`do_resize=False`. OUT gets `<id>.pixel_values` and `<id>.grid_thw` per case, or `<id>.error` (the message as
UTF-8 bytes) where the processor raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qzoom.evals.torchvision_shim import import_torchvision


def main(ref_dir: str, cases_dir: str, out: str) -> int:
    import_torchvision(ref_dir)  # before transformers, so that it finds torchvision
    import torch
    from PIL import Image
    from qwen_vl_utils import fetch_image
    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    cases = json.loads((Path(cases_dir) / "cases.json").read_text())
    processors: dict[str, Qwen2VLImageProcessor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for case in cases:
        name = case["processor"]
        if name not in processors:
            processors[name] = Qwen2VLImageProcessor.from_pretrained(str(Path(cases_dir) / name))
        processor = processors[name]
        image = Image.open(Path(cases_dir) / case["image"])
        image.load()
        low, high = case["budget"]
        try:
            if case["kind"] == "prefit":
                element = {"image": image, "min_pixels": low, "max_pixels": high}
                fitted = fetch_image(element, image_patch_size=processor.patch_size)
                result = processor(images=[fitted], do_resize=False, return_tensors="pt")
            else:
                size = {"shortest_edge": low, "longest_edge": high}
                result = processor(images=[image], size=size, return_tensors="pt")
        except ValueError as err:
            tensors[f"{case['id']}.error"] = torch.tensor(list(str(err).encode()), dtype=torch.uint8)
            continue
        tensors[f"{case['id']}.pixel_values"] = result["pixel_values"].contiguous()
        tensors[f"{case['id']}.grid_thw"] = result["image_grid_thw"][0].contiguous()
    save_file(tensors, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
