"""The `zoom` tool, executed in process: what the MCP server, the LangChain tool and the service call.

    runner = ZoomToolRunner(worker)
    image_id = runner.images.put(image)                      # or pass image_data (base64 / data URL) in the args
    result = await runner.zoom(ZoomArgs(image_id=image_id, box=ZoomBox(coords=[0.5, 0, 1, 0.5], frame="unit")))
    result = await runner.zoom(ZoomArgs(image_id=image_id, query="What is written on the sign?"))   # SD-RPN box

A caller's box is mapped from its frame into original pixels, grown by the margin, clamped into the image and to
the minimum side (28 px, one Qwen2.5-VL token); a box entirely outside the image is a ValueError naming the image
size (`frames.BoxOutsideImage`). Without a box the SD-RPN proposes one for the query (the gate's
score comes along when the checkpoint has a gate). The crop is cut from the original image and returned as PNG,
optionally downscaled to `output_max_side`.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from qzoom.admission import Budget, Cost
from qzoom.cache import image_digest
from qzoom.engine import Proposal
from qzoom.guards import probe_image
from qzoom.images import load_image
from qzoom.roi import PixelBox
from qzoom.schemas import AskOptions
from qzoom.tools.frames import check_inside, clamp_box, expand_box
from qzoom.tools.schema import HeatmapSummary, ZoomArgs, ZoomResult
from qzoom.worker import Worker

MIN_SIDE = 28  # one Qwen2.5-VL token side
MAX_ASPECT = 100.0  # crops beyond this are grown on their short side (the engine pads views past it anyway)


class UnknownImage(KeyError):
    """An image_id that this process has not seen (or has evicted)."""


class ImageStore:
    """Images by content id (blake2b of the decoded pixels), LRU-bounded by count and by decoded bytes (RGB, 3 per
    pixel): upload once, zoom many times.

    Hand-written rather than a cachetools cache: it has two bounds (count and bytes), a cachetools cache one."""

    def __init__(self, max_images: int = 256, max_bytes: int = 1 << 30) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, image: Image.Image) -> str:
        image_id = image_digest(image)
        with self._lock:
            old = self._images.pop(image_id, None)
            if old is not None:
                self._bytes -= old.width * old.height * 3
            self._images[image_id] = image
            self._bytes += image.width * image.height * 3
            while len(self._images) > 1 and (len(self._images) > self.max_images or self._bytes > self.max_bytes):
                _, gone = self._images.popitem(last=False)
                self._bytes -= gone.width * gone.height * 3
        return image_id

    def get(self, image_id: str) -> Image.Image:
        with self._lock:
            image = self._images.get(image_id)
            if image is None:
                raise UnknownImage(f"unknown image_id {image_id!r}: upload the image first, or send it as image_data")
            self._images.move_to_end(image_id)
            return image


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ZoomToolRunner:
    """Runs `zoom` tool calls against a started `Worker` (the SD-RPN and gate run on its device thread)."""

    def __init__(
        self,
        worker: Worker,
        images: ImageStore | None = None,
        *,
        allow_image_path: bool = False,
        max_pixels: int | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.worker = worker
        self.images = images or ImageStore()
        self.allow_image_path = allow_image_path  # only the local stdio MCP server reads files
        # The guards of every entry point (qzoom.guards): the pixel cap (None: QZOOM_MAX_PIXELS_IN), and the
        # service's image-memory budget held while an image is decoded.
        self.max_pixels = max_pixels
        self.budget = budget

    def parse(self, arguments: dict[str, object]) -> ZoomArgs:
        """Validate raw tool arguments (ValidationError names each bad field and what is accepted)."""
        return ZoomArgs.model_validate(arguments, context={"allow_image_path": self.allow_image_path})

    def load(self, args: ZoomArgs) -> Image.Image:
        if args.image_id is not None:
            return self.images.get(args.image_id)
        data = args.image_bytes()
        source: bytes | Path
        if data is not None:
            source = data
        else:
            assert args.image_path is not None  # ZoomArgs guarantees exactly one image source
            if not self.allow_image_path:
                raise PermissionError("image_path is accepted only by the local stdio server")
            source = Path(args.image_path).expanduser()
        if self.budget is None:
            return load_image(source, self.max_pixels)
        header = probe_image(source, self.max_pixels)
        with self.budget.admit(Cost(0, header.decode_bytes)):
            return load_image(source, self.max_pixels)

    async def zoom(self, args: ZoomArgs) -> ZoomResult:
        image = self.load(args)
        wh = (image.width, image.height)
        margin = args.margin or 0.0
        if args.box is not None:
            requested = args.box.to_original(wh)
            # Checked before the margin: a box outside the image is a caller's mistake, not a region to grow into.
            check_inside(requested, wh, shown=f"{list(args.box.coords)} (frame {args.box.frame.value})")
            raw = expand_box(requested, margin) if margin else requested
            box = clamp_box(raw, wh, min_side=MIN_SIDE, max_aspect=MAX_ASPECT)
            return ZoomResult(
                crop_png_b64=png_b64(self._crop(image, box, args.output_max_side)),
                crop_wh=list(self._crop_size(box, args.output_max_side)),
                box=list(box),
                image_wh=list(wh),
                found=True,
                box_source="caller",
                frame=args.box.frame,
                requested_box=list(args.box.coords),
            )
        return await self._proposed(image, args)

    async def gate(self, image: Image.Image, query: str) -> tuple[float, float]:
        """The gate's probability that `query` needs a closer look at `image`, and the checkpoint's τ_gate."""
        engine = self.worker.engine
        if not engine.has_gate:
            raise ValueError("this checkpoint has no gate (enable_high_res is false); use propose or zoom")
        with self.worker.admit():
            st = engine.new_state(image, query)
            await self.worker.call("observe", st)
            score: float = await self.worker.call("gate", st)
        return float(score), st.gate_thresh

    async def proposal(
        self, image: Image.Image, query: str, *, max_boxes: int | None = None, margin: float = 0.0
    ) -> tuple[Proposal, float | None, float]:
        """The SD-RPN's full proposal for `query` on the coarse view (map included), the gate's score when the
        checkpoint has a gate, and τ_roi. `max_boxes` None: the checkpoint's."""
        engine = self.worker.engine
        if not engine.has_rpn:
            raise ValueError("this checkpoint has no region proposer (SD-RPN): send a box")
        with self.worker.admit():
            st = engine.new_state(image, query, AskOptions(max_boxes=max_boxes, margin=margin))
            await self.worker.call("observe", st)
            if engine.has_gate:
                await self.worker.call("gate", st)
            proposal: Proposal = await self.worker.call("propose", st)
        return proposal, (st.gate_scores[0] if st.gate_scores else None), st.roi_thresh

    async def propose(
        self, image: Image.Image, query: str, *, max_boxes: int | None = None, margin: float = 0.0
    ) -> tuple[list[PixelBox], bool, float | None, HeatmapSummary]:
        """The SD-RPN's boxes for `query` (the whole image when no cell passes τ_roi), whether any cell did
        (`found`), the gate's score when the checkpoint has a gate, and a summary of the probability map."""
        proposal, gate_score, roi_thresh = await self.proposal(image, query, max_boxes=max_boxes, margin=margin)
        prob = proposal.prob.float()
        summary = HeatmapSummary(
            grid_hw=list(prob.shape),
            threshold=roi_thresh,
            max_prob=float(prob.max()),
            mean_prob=float(prob.mean()),
            cells_above=int((prob > roi_thresh).sum()),
        )
        return proposal.boxes or [proposal.block.box], bool(proposal.boxes), gate_score, summary

    async def _proposed(self, image: Image.Image, args: ZoomArgs) -> ZoomResult:
        """No box: the SD-RPN proposes one for the query (gate score included when there is a gate)."""
        # One crop comes back, so it is the paper's one box around every cell the SD-RPN lit, whatever number of
        # boxes the checkpoint zooms on by itself.
        boxes, found, gate_score, summary = await self.propose(
            image, args.query or "", max_boxes=1, margin=args.margin or 0.0
        )
        b = boxes[0]
        box = (b.x0, b.y0, b.x1, b.y1)
        return ZoomResult(
            crop_png_b64=png_b64(self._crop(image, box, args.output_max_side)),
            crop_wh=list(self._crop_size(box, args.output_max_side)),
            box=list(box),
            image_wh=[image.width, image.height],
            found=found,
            box_source="sd_rpn",
            gate_score=gate_score,
            heatmap=summary,
        )

    @staticmethod
    def _crop_size(box: tuple[int, int, int, int], max_side: int | None) -> tuple[int, int]:
        w, h = box[2] - box[0], box[3] - box[1]
        if max_side is None or max(w, h) <= max_side:
            return w, h
        scale = max_side / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))

    def _crop(self, image: Image.Image, box: tuple[int, int, int, int], max_side: int | None) -> Image.Image:
        crop = image.crop(box)
        size = self._crop_size(box, max_side)
        return crop if size == crop.size else crop.resize(size, Image.Resampling.LANCZOS)
