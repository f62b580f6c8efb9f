"""What the three training stages share: the data format, the run directory (resume) and the optimisation loop.

Data format (``--data FILE.jsonl``)
    One JSON object per line::

        {"image": "imgs/0001.png", "question": "What is written on the red plate?", "answer": "K7X",
         "box": [412, 96, 470, 131], "uid": "0001", "needs_detail": true}

    ``image`` (a path, relative to the JSONL file's folder unless absolute), ``question`` and ``answer`` are
    required. ``box`` (``[x0, y0, x1, y1]`` in original-image pixels, x1/y1 exclusive) is optional and is used for one
    thing only: ranking attention heads on Stage 1's calibration items (it never enters a label). ``uid`` defaults to
    the line number; ``needs_detail`` and any other keys are kept for the caller and ignored by training. The
    ``items.jsonl`` written by ``qzoom eval export-synthetic`` is in this format. :class:`SyntheticItems` draws the
    same records from :mod:`qzoom.evals.synthetic` on the fly (``--synthetic N``).

Run directory (resume)
    ``OUT/trainer/`` holds ``state.json`` (stage, step, data position, what the run was started with), the newest
    save point ``step-N/`` (``trainable.safetensors`` with the trained tensors only, ``optimizer.pt``), the stage's
    mined records (``*.jsonl``, appended batch by batch, so mining resumes too) and ``log.jsonl`` (loss, lr per
    step). Rerunning the same command continues from the newest save point; a run that finished returns at once.
    The finished checkpoint is an ordinary qzoom HF directory in ``OUT`` itself. A different model, data or
    setting in the same ``OUT`` is refused with a message naming what differs.

Optimisation (:func:`fit`)
    AdamW on the given parameters, linear warmup then cosine decay to zero, gradient clipping, a seeded sample order
    (one permutation per epoch; the data position is the number of samples consumed), bf16 autocast on CUDA by
    default. Everything else in the model stays frozen, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qzoom.backbones import backbone_of
from qzoom.cache import image_digest
from qzoom.checkpoint import load_model, save_checkpoint
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.images import load_image
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration
from qzoom.offline import OfflineQwen2_5_VLProcessor
from qzoom.schemas import AskOptions

Box = tuple[int, int, int, int]
S = TypeVar("S")


class TrainingError(ValueError):
    """Training cannot start or continue; the message says what was wrong and what is accepted."""


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TrainItem:
    """One (image, question, answer) sample; ``box`` only ranks Stage-1 heads (never a label).

    ``digest`` is :func:`qzoom.cache.image_digest` of ``image`` when the data source has computed it before: the
    engine then skips hashing the pixels and, on a feature-cache hit, resizing them (training revisits every item).
    """

    uid: str
    image: Image.Image
    question: str
    answer: str
    box: Box | None = None
    needs_detail: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    digest: str | None = field(default=None, compare=False)  # the pixels' cache digest, when already known


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str
    box: tuple[int, int, int, int] | None = None
    uid: str | int | None = None
    needs_detail: bool | None = None


def _memo_digest(memo: dict[int, str], index: int, image: Image.Image) -> str:
    # An index of a data source always yields the same pixels (a file, or a pure function of the index), so its
    # digest is computed once per source object.
    if index not in memo:
        memo[index] = image_digest(image)
    return memo[index]


class JsonlItems(Sequence[TrainItem]):
    """The items of a JSONL file in the documented format; images are read when an item is accessed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TrainingError(f"data file {self.path} does not exist (expected a JSONL file, one item per line)")
        self.records: list[_Record] = []
        with self.path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = _Record.model_validate_json(line)
                except ValidationError as err:
                    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
                    raise TrainingError(
                        f"{self.path}:{number}: {problems}. Each line must be a JSON object with 'image' (path), "
                        "'question' and 'answer' (strings), and optionally 'box' ([x0, y0, x1, y1] pixels) and 'uid'"
                    ) from err
                if record.uid is None:
                    record.uid = str(number)
                self.records.append(record)
        if not self.records:
            raise TrainingError(f"data file {self.path} holds no items")
        self._digests: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> TrainItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[TrainItem]: ...
    def __getitem__(self, index: int | slice) -> TrainItem | list[TrainItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self.records[index]
        image_path = Path(record.image)
        if not image_path.is_absolute():
            image_path = self.path.parent / image_path
        extra = {k: v for k, v in (record.model_extra or {}).items()}
        image = load_image(image_path)
        return TrainItem(
            uid=str(record.uid),
            image=image,
            question=record.question,
            answer=record.answer,
            box=record.box,
            needs_detail=record.needs_detail,
            extra=extra,
            digest=_memo_digest(self._digests, index % len(self), image),
        )


class SyntheticItems(Sequence[TrainItem]):
    """Items ``start .. start + n - 1`` of a split of the synthetic benchmark, generated when accessed."""

    def __init__(
        self,
        n: int,
        *,
        split: str = "train",
        seed: int = 0,
        start: int = 0,
        families: Sequence[str] | None = None,
        min_side: int = 896,
        max_side: int = 4096,
    ) -> None:
        if n < 1:
            raise TrainingError(f"--synthetic takes a positive number of items, got {n}")
        self.n, self.split, self.seed, self.start = n, split, seed, start
        self.families = tuple(families) if families is not None else None
        self.min_side, self.max_side = min_side, max_side
        self._digests: dict[int, str] = {}

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> TrainItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[TrainItem]: ...
    def __getitem__(self, index: int | slice) -> TrainItem | list[TrainItem]:
        from qzoom.evals.synthetic import generate_item

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        item = generate_item(
            self.split,
            self.start + index % self.n,
            seed=self.seed,
            families=self.families,
            min_side=self.min_side,
            max_side=self.max_side,
        )
        return TrainItem(
            uid=item.uid,
            image=item.image,
            question=item.question,
            answer=item.answer,
            box=item.box,
            needs_detail=item.needs_detail,
            extra={"family": item.family},
            digest=_memo_digest(self._digests, index % self.n, item.image),
        )


def data_source(
    data: str | Path | None,
    synthetic: int | None,
    *,
    seed: int = 0,
    split: str = "train",
    families: Sequence[str] | None = None,
    min_side: int = 896,
    max_side: int = 4096,
) -> JsonlItems | SyntheticItems:
    """Exactly one of a JSONL file (`data`) or `synthetic` items of the benchmark's `split` (the commands' sources),
    the synthetic ones of `families` only when given."""
    if (data is None) == (synthetic is None):
        raise TrainingError("give exactly one data source: --data FILE.jsonl or --synthetic N")
    if data is not None:
        return JsonlItems(data)
    assert synthetic is not None
    return SyntheticItems(synthetic, split=split, seed=seed, families=families, min_side=min_side, max_side=max_side)


def items_fingerprint(items: Sequence[TrainItem] | JsonlItems | SyntheticItems) -> str:
    """A digest of which items these are (their uids, or the generator's arguments), without decoding any image."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(items, SyntheticItems):
        digest.update(json.dumps([items.n, items.split, items.seed, items.start, items.families]).encode())
        digest.update(json.dumps([items.min_side, items.max_side]).encode())
    elif isinstance(items, JsonlItems):
        digest.update(json.dumps([str(r.uid) for r in items.records]).encode())
    else:
        digest.update(json.dumps([item.uid for item in items]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Settings shared by every stage


class TrainConfig(BaseModel):
    """Optimisation and runtime settings; each stage subclasses it with its own recipe defaults."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(8, ge=1, description="samples per optimizer step")
    epochs: float = Field(1.0, gt=0, description="passes over the training samples")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (default: epochs)")
    warmup_frac: float = Field(0.03, ge=0, lt=1, description="fraction of the steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    save_every: int = Field(50, ge=1, description="optimizer steps between resumable save points")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights (trained ones included)")
    autocast: bool | None = Field(None, description="bf16 autocast for the trained forward (default: on CUDA only)")
    min_pixels: int | None = Field(None, ge=784, description="lower pixel budget of each view (default: checkpoint)")
    max_pixels: int | None = Field(None, ge=784, description="upper pixel budget of each view (default: checkpoint)")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="answer length limit when the model answers")
    mine_batch_size: int = Field(8, ge=1, description="samples per batch when the frozen model answers (mining)")
    progress: bool = Field(True, description="tqdm progress bars on stderr")

    def run_identity(self) -> dict[str, Any]:
        """The settings that decide what a run computes (a resumed run must match them)."""
        runtime = {"device", "dtype", "autocast", "progress", "save_every", "mine_batch_size"}
        return self.model_dump(exclude=runtime, mode="json")

    def options(self, **overrides: Any) -> AskOptions:
        values: dict[str, Any] = {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "max_new_tokens": self.max_new_tokens,
        }
        values.update(overrides)
        return AskOptions(**values)

    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    def autocast_context(self) -> AbstractContextManager[Any]:
        """bf16 autocast around the trained forward: on CUDA by default, anywhere when `autocast` is true."""
        device = torch.device(self.device)
        enabled = self.autocast if self.autocast is not None else device.type == "cuda"
        if not enabled:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise TrainingError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")


def load_for_training(
    model_dir: str | Path, config: TrainConfig
) -> tuple[QZoomQwen2_5_VLForConditionalGeneration, OfflineQwen2_5_VLProcessor]:
    """The checkpoint and its processor on the configured device, every parameter frozen (stages unfreeze theirs)."""
    return load_frozen(model_dir, config.device, config.torch_dtype())


def load_frozen(
    model_dir: str | Path, device: str, dtype: torch.dtype | None = None
) -> tuple[QZoomQwen2_5_VLForConditionalGeneration, OfflineQwen2_5_VLProcessor]:
    """A checkpoint directory and its processor on ``device``, every parameter frozen; a clear error for a directory
    without config.json or a device this machine lacks."""
    check_device(device)
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise TrainingError(f"model directory {directory} holds no config.json (expected an HF checkpoint directory)")
    if torch.device(device).type == "cuda":
        # TF32 matmuls for the frozen float32 parts (mining); trained parts run under bf16 autocast anyway.
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_model(directory, device=device, dtype=dtype)
    model.requires_grad_(False)
    return model, backbone_of(model).load_processor(directory)


def make_engine(model: QZoomQwen2_5_VLForConditionalGeneration, processor: OfflineQwen2_5_VLProcessor) -> QZoomEngine:
    """An engine for the frozen parts (mining, inputs of the trained branch). Build it after attaching branches."""
    return QZoomEngine(model, processor, name="train")


def unfreeze(modules: Sequence[torch.nn.Module]) -> None:
    """Make every parameter of `modules` trainable (the rest of the model stays as frozen as it was)."""
    for module in modules:
        module.requires_grad_(True)


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, in state-dict order, shared tensors once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def record_training(model: QZoomQwen2_5_VLForConditionalGeneration, entry: dict[str, Any]) -> None:
    """Append one stage's summary to `config.qzoom_training` (written into config.json)."""
    history = list(getattr(model.config, "qzoom_training", None) or [])
    history.append(entry)
    model.config.qzoom_training = history


# ---------------------------------------------------------------------------------------------------------------------
# The run directory


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def update_config(model_dir: str | Path, settings: dict[str, Any], record: dict[str, Any]) -> Path:
    """Set ``settings`` in a checkpoint's ``config.json`` in place and put ``record`` (with its ``"stage"``) in its
    ``qzoom_training`` history, replacing an earlier record of that stage (a calibration rerun replaces its record)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(settings)
    history = [e for e in config.get("qzoom_training") or [] if e.get("stage") != record["stage"]]
    config["qzoom_training"] = [*history, record]
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


class RunDir:
    """``OUT/trainer``: the resumable state of one stage's run (see the module docstring)."""

    def __init__(self, out_dir: str | Path, stage: str, identity: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.dir = self.out / "trainer"
        self.stage = stage
        self.identity = identity
        self.state: dict[str, Any] = {"stage": stage, "identity": identity, "step": 0, "position": 0, "done": False}
        path = self.dir / "state.json"
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("stage") != stage:
                raise TrainingError(
                    f"{self.out} holds a {saved.get('stage')} run; write {stage} into another output directory"
                )
            if saved.get("identity") != identity:
                old, new = saved.get("identity", {}), identity
                differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise TrainingError(
                    f"{self.out} holds a {stage} run started with different {', '.join(differ)} "
                    f"(was {[old.get(k) for k in differ]}, now {[new.get(k) for k in differ]}); rerun with the same "
                    "model, data and settings to continue it, or choose another output directory"
                )
            self.state = saved
        else:
            if self.out.exists() and (self.out / "config.json").exists():
                raise TrainingError(
                    f"{self.out} already holds a checkpoint that no {stage} run wrote; choose an empty output directory"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_state()

    @property
    def done(self) -> bool:
        return bool(self.state.get("done"))

    def _write_state(self) -> None:
        atomic_write_text(self.dir / "state.json", json.dumps(self.state, indent=1))

    def path(self, name: str) -> Path:
        return self.dir / name

    def read_records(self, name: str) -> dict[int, dict[str, Any]]:
        """Mined records by item index (a torn last line from an interrupted run is dropped)."""
        path = self.path(name)
        out: dict[int, dict[str, Any]] = {}
        if not path.exists():
            return out
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[int(record["index"])] = record
        return out

    def append_records(self, name: str, records: Sequence[dict[str, Any]]) -> None:
        with self.path(name).open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_json(self, name: str, value: Any) -> None:
        atomic_write_text(self.path(name), json.dumps(value, indent=1))

    def load_json(self, name: str) -> Any:
        path = self.path(name)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def save_point(
        self,
        step: int,
        position: int,
        params: Sequence[tuple[str, torch.nn.Parameter]],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Write step-N/ (trained tensors + optimizer), then point state.json at it, then drop the older one."""
        target = self.dir / f"step-{step}"
        tmp = self.dir / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({name: p.detach().contiguous().cpu() for name, p in params}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        previous = self.state.get("save_point")
        self.state.update(step=step, position=position, save_point=target.name)
        self._write_state()
        if previous and previous != target.name:
            shutil.rmtree(self.dir / previous, ignore_errors=True)

    def restore(
        self, params: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer
    ) -> tuple[int, int]:
        """Load the newest save point into `params` and `optimizer`; returns (step, position), (0, 0) if none."""
        name = self.state.get("save_point")
        if not name:
            return 0, 0
        point = self.dir / name
        tensors = load_file(str(point / "trainable.safetensors"))
        with torch.no_grad():
            for pname, p in params:
                if pname not in tensors:
                    raise TrainingError(f"save point {point} lacks {pname}; delete {self.dir} to start over")
                p.copy_(tensors[pname].to(p.device, p.dtype))
        optimizer.load_state_dict(torch.load(point / "optimizer.pt", map_location=params[0][1].device))
        return int(self.state["step"]), int(self.state["position"])

    def log(self, entry: dict[str, Any]) -> None:
        with self.path("log.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def finish(
        self,
        model: QZoomQwen2_5_VLForConditionalGeneration,
        processor: OfflineQwen2_5_VLProcessor,
        summary: dict[str, Any],
    ) -> Path:
        """Write the HF checkpoint into OUT, mark the run done and drop the save point (its optimizer is large)."""
        record_training(model, {"stage": self.stage, **summary})
        save_checkpoint(model, processor, self.out)
        previous = self.state.get("save_point")
        self.state.update(done=True, summary=summary, save_point=None)
        self._write_state()
        if previous:
            shutil.rmtree(self.dir / previous, ignore_errors=True)
        return self.out


# ---------------------------------------------------------------------------------------------------------------------
# Mining (the frozen model answering, labelling) and fitting


def mine(
    run: RunDir,
    name: str,
    items: Sequence[S],
    work: Callable[[list[int], list[S]], list[dict[str, Any]]],
    *,
    batch_size: int,
    desc: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run `work(indices, items)` over `items` in batches, appending its records (each with "index") to `name`.

    Items already recorded by an interrupted run are skipped. Returns every record in item order.
    """
    done = run.read_records(name)
    todo = [i for i in range(len(items)) if i not in done]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress, unit="item") as bar:
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            records = work(indices, [items[i] for i in indices])
            run.append_records(name, records)
            for record in records:
                done[int(record["index"])] = record
            bar.update(len(indices))
    return [done[i] for i in sorted(done) if i < len(items)]


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup over round(warmup_frac * total) steps, then cosine decay to 0 at `total` (step is 0-based)."""
    warmup = round(warmup_frac * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sample_order(n: int, position: int, count: int, seed: int) -> list[int]:
    """Sample indices `position .. position + count - 1` of the stream: one seeded permutation of range(n) per epoch."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for p in range(position, position + count):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.append(perms[epoch][p % n])
    return out


LossFn = Callable[[list[S]], torch.Tensor | None]


@dataclass
class FitResult:
    steps: int
    samples: int
    last_loss: float | None


def fit(
    run: RunDir,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    samples: Sequence[S],
    loss_fn: Callable[[list[S]], torch.Tensor | None],
    config: TrainConfig,
    *,
    desc: str,
) -> FitResult:
    """Optimise `params` on `loss_fn` over batches of `samples`; resumable through `run` (see the module docstring).

    `loss_fn(batch)` returns the batch's mean loss with a graph to `params`, or None when the batch carries no
    supervision (then the step only advances the data position).
    """
    if not samples:
        raise TrainingError("no training samples")
    n = len(samples)
    total = config.max_steps or max(1, math.ceil(config.epochs * n / config.batch_size))
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=config.weight_decay, foreach=False)
    step, position = run.restore(params, optimizer)
    run.state["total_steps"] = total
    last: float | None = None
    with tqdm(total=total, initial=step, desc=desc, disable=not config.progress, unit="step") as bar:
        while step < total:
            batch = [samples[i] for i in sample_order(n, position, config.batch_size, config.seed)]
            lr = lr_at(step, total, config.lr, config.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            # Explicitly on: a caller (or a benchmark earlier in the process) may have switched autograd off globally.
            with torch.enable_grad():
                loss = loss_fn(batch)
                if loss is not None:
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {float(loss)} at step {step}; lower --lr or check the data"
                        )
                    loss.backward()
            if loss is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
                optimizer.step()
                last = float(loss.detach())
            step += 1
            position += config.batch_size
            run.log({"step": step, "loss": last if loss is not None else None, "lr": lr})
            bar.update(1)
            if last is not None:
                bar.set_postfix(loss=f"{last:.4f}")
            if step % config.save_every == 0 or step == total:
                run.save_point(step, position, params, optimizer)
    return FitResult(steps=total, samples=n, last_loss=last)


def new_states(engine: QZoomEngine, items: Sequence[TrainItem], options: AskOptions) -> list[SequenceState]:
    """Engine states for `items` at `options`, with the pixel digests the data source already knows."""
    states = [engine.new_state(item.image, item.question, options) for item in items]
    for st, item in zip(states, items, strict=True):
        if item.digest is not None:
            st.digest = item.digest
    return states


def answer_batch(
    engine: QZoomEngine, items: Sequence[TrainItem], options: AskOptions, *, zoom: bool = False
) -> list[str]:
    """The frozen model's greedy answers on the coarse view alone (no gate, no zoom), or with ``zoom`` after one SD-RPN
    zoom step on every item (the gate bypassed; an item with no cell above τ_roi keeps its coarse view)."""
    states = new_states(engine, items, options)
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)
    if zoom:
        engine.zoom(states, engine.propose(states))
    engine.finish(states)
    engine.decode(states)
    return [st.answer for st in states]
