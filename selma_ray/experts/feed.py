"""The training feed: a skill's rows streamed from the run's storage into its Train workers.

Nothing that grows with the data passes through the driver. It builds lazy Ray Datasets:
Parquet read with column projection and the skill filter, the deterministic validation split,
decoding and resizing in Ray Data tasks, into **uint8** pixels (or cached latents), never
float32. Ray Train splits the training set among an expert's workers
(``get_dataset_shard``), in block order (``data_config``), so a rank's rows are the same in
every run and epoch. Each worker then:

- draws the **order** of every epoch from a generator seeded by (run seed, skill, epoch, rank):
  with ``feed=memory`` its shard is read once into the worker and fully permuted every epoch;
  with ``feed=stream`` it is read from storage every epoch, block by block, through a
  shuffle buffer (``shuffle_buffer`` rows, ``shuffled``) seeded the same way (a full
  ``random_shuffle`` per epoch would be an all-to-all exchange holding the whole data set
  in the object store);
- draws **crops and flips** from a generator seeded by (run seed, skill, epoch, row), in the
  worker, so the same seed gives the same batches and another epoch other ones;
- keeps its **position** (epoch, batches taken in it), which the checkpoint stores, so a
  resumed run continues the data order where the checkpoint left it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
from ray.data import TaskPoolStrategy
from ray.data._internal.execution.execution_callback import ExecutionCallback

from selma_ray.core.udf import require_columns

log = logging.getLogger(__name__)
KEY_COLUMNS = ["prompt_id", "image_index"]
ROW_COLUMNS = [*KEY_COLUMNS, "prompt", "image"]
DATA_CPUS = 0.1  # read and decode tasks: small, so scarce CPUs never starve the feed
# Tasks in flight per feed dataset. A read fuses with the maps after it only when all share
# this cap, and with DATA_CPUS alone 2 CPUs would run 20 of them, each holding a shard.
DATA_CONCURRENCY = 2
DATA_TASKS: dict[str, Any] = {
    "num_cpus": DATA_CPUS,
    "compute": TaskPoolStrategy(size=DATA_CONCURRENCY),
}
READ_TASKS: dict[str, Any] = {"num_cpus": DATA_CPUS, "concurrency": DATA_CONCURRENCY}  # reads
HASH_MOD = 2**64
T = TypeVar("T")
LOOP_PERIOD_S = 0.02  # the shortest step of a feed execution's scheduling loop (LoopPacer)


def unit(*parts: Any) -> int:
    """A stable 63-bit integer of ``parts`` (a seed for generators and orders)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_rng(seed: int, skill: str, epoch: int, key: str) -> np.random.Generator:
    """The generator of one row's crop and flip in one epoch."""
    return np.random.default_rng(unit(seed, skill, "augment", epoch, key))


def order_seed(seed: int, skill: str, epoch: int, rank: int) -> int:
    return unit(seed, skill, "order", epoch, rank)


def row_keys(batch: dict[str, Any]) -> np.ndarray:
    """``<prompt_id>/<image_index>``: a row's identity across runs and re-renders."""
    return np.asarray(
        [f"{p}/{i}" for p, i in zip(batch["prompt_id"], batch["image_index"], strict=True)],
        dtype=object,
    )


def with_keys(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray Data UDF: adds the ``key`` column."""
    require_columns("the training feed (with_keys)", batch, KEY_COLUMNS)
    return {**batch, "key": row_keys(batch)}


# ---- the validation split -------------------------------------------------------------------
def validation_size(rows: int, skill: str, fraction: float, count: int | None) -> int:
    want = count if count is not None else (max(1, round(fraction * rows)) if fraction > 0 else 0)
    if want and want >= rows:
        raise ValueError(
            f"skill {skill!r} has {rows} image(s); a validation split of {want} leaves none to "
            "train on. Lower experts.validation_count/validation_fraction or add images"
        )
    return want


def split_rank(seed: int, skill: str, key: str) -> int:
    """Rows with the smallest ranks are held out: a row's side of the split depends on its
    key alone, not on the order or the other rows."""
    return unit(seed, skill, "split", key)


def choose_validation(
    keys: list[str], seed: int, skill: str, fraction: float, count: int | None
) -> list[str]:
    """The held-out keys among ``keys`` (the rule ``split_validation`` applies at scale)."""
    want = validation_size(len(keys), skill, fraction, count)
    return sorted(keys, key=lambda k: (split_rank(seed, skill, k), k))[:want]


def _smallest(batch: dict[str, Any], seed: int, skill: str, want: int) -> dict[str, Any]:
    """Ray Data UDF: this batch's ``want`` candidates for the held-out rows."""
    ranks = np.asarray([split_rank(seed, skill, k) for k in batch["key"]], dtype=np.uint64)
    keep = np.lexsort((batch["key"].astype(str), ranks))[:want]
    return {"key": batch["key"][keep], "prompt": batch["prompt"][keep], "rank": ranks[keep]}


def split_validation(
    ds, rows: int, seed: int, skill: str, fraction: float, count: int | None
) -> tuple[list[str], list[str]]:
    """(held-out keys, their prompts) of a dataset of ``rows`` rows with ``prompt_id``,
    ``image_index`` and ``prompt``. The driver receives only candidates: at most ``want`` rows
    per block, never the data set."""
    want = validation_size(rows, skill, fraction, count)
    if not want:
        return [], []
    candidates = (
        ds.select_columns([*KEY_COLUMNS, "prompt"])
        .map_batches(with_keys, batch_format="numpy", **DATA_TASKS)
        .map_batches(
            _smallest,
            fn_kwargs={"seed": seed, "skill": skill, "want": want},
            batch_format="numpy",
            **DATA_TASKS,
        )
        .take_all()
    )
    chosen = sorted(candidates, key=lambda r: (int(r["rank"]), str(r["key"])))[:want]
    return [str(r["key"]) for r in chosen], [str(r["prompt"]) for r in chosen]


def _keep_rows(batch: dict[str, Any], keys: list[str], held_out: bool) -> dict[str, Any]:
    """Ray Data UDF: the held-out rows (``held_out``) or the others, with their keys."""
    batch = with_keys(batch)
    mask = np.isin(batch["key"].astype(str), np.asarray(keys, dtype=str))
    mask = mask if held_out else ~mask
    return {k: v[mask] for k, v in batch.items()}


# ---- what the expert learned from -------------------------------------------------------------
def _digest_sum(batch: dict[str, Any]) -> dict[str, Any]:
    total = 0
    for prompt, image in zip(batch["prompt"], batch["image"], strict=True):
        h = hashlib.sha256(str(prompt).encode() + b"\0" + bytes(image) + b"\0").digest()
        total = (total + int.from_bytes(h[:8], "little")) % HASH_MOD
    return {
        "rows": np.asarray([len(batch["prompt"])]),
        "sum": np.asarray([str(total)], dtype=object),
    }


def scan(ds) -> tuple[int, str]:
    """(rows, a short hash of the prompts and image bytes whatever their order) of a dataset,
    in one pass: two numbers per block reach the driver."""
    parts = (
        ds.select_columns(["prompt", "image"])
        .map_batches(_digest_sum, batch_format="numpy", batch_size=None, **DATA_TASKS)
        .take_all()
    )
    total = sum(int(r["sum"]) for r in parts) % HASH_MOD
    return sum(int(r["rows"]) for r in parts), f"{total:016x}"


# ---- decoding (Ray Data tasks) and augmentation (in the worker) -------------------------------
def decode_batch(batch: dict[str, Any], size: int, center: bool) -> dict[str, Any]:
    """Ray Data UDF: PNG bytes -> uint8 HWC images whose shorter side is ``size`` (cropped to
    the centre square when ``center``; else the worker crops) and the original size. Only
    Pillow and numpy: a data task never imports torch or transformers."""
    import io

    from PIL import Image

    require_columns("the training feed (decode_batch)", batch, ["key", "prompt", "image"])
    images, sizes, crops = [], [], []
    for data in batch["image"]:
        with Image.open(io.BytesIO(data)) as src:
            img = src.convert("RGB")
        sizes.append((img.height, img.width))
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        top, left = (h - size) // 2, (w - size) // 2
        if center:
            img = img.crop((left, top, left + size, top + size))
        images.append(np.asarray(img, dtype=np.uint8))
        crops.append((top, left))
    shapes = {a.shape for a in images}
    out: dict[str, Any] = {
        "key": batch["key"],
        "prompt": np.asarray([str(p) for p in batch["prompt"]], dtype=object),
        "image": np.stack(images) if len(shapes) == 1 else _objects(images),
        "original_size": np.asarray(sizes, dtype=np.int64),
    }
    if center:
        out["crop_top_left"] = np.asarray(crops, dtype=np.int64)
    return out


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def augment(
    batch: dict[str, Any], seed: int, skill: str, epoch: int, size: int, crop: str, flip: bool
) -> dict[str, Any]:
    """One batch as model inputs: each row cropped (centre or random) and flipped from its own
    generator (``row_rng``), pixels to float32 in [-1, 1]; with cached latents, the flipped or
    the plain latents, chosen the same way. The caller adds the token ids (``token_ids``)."""
    rngs = [row_rng(seed, skill, epoch, str(k)) for k in batch["key"]]
    if "latent_mean" in batch:
        out = {k: v for k, v in batch.items() if not k.endswith("_flip")}
        if "latent_mean_flip" in batch:
            pick = np.asarray([rng.random() < 0.5 for rng in rngs])
            for name in ("latent_mean", "latent_std"):
                out[name] = np.where(pick[:, None, None, None], batch[f"{name}_flip"], batch[name])
        return out
    pixels, crops = [], []
    for img, rng in zip(batch["image"], rngs, strict=True):
        h, w = img.shape[:2]
        if crop == "random":
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        arr = img[top : top + size, left : left + size]
        if flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        pixels.append(arr)
        crops.append((top, left))
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixel_values"] = np.ascontiguousarray(
        np.stack(pixels).transpose(0, 3, 1, 2), dtype=np.float32
    ) / np.float32(127.5) - np.float32(1.0)
    if "crop_top_left" not in batch or crop == "random":
        out["crop_top_left"] = np.asarray(crops, dtype=np.int64)
    return out


# ---- the datasets ------------------------------------------------------------------------------
def training_datasets(
    rows,
    held_out: list[str],
    loop: dict[str, Any],
    cache: tuple[Any, str] | None = None,
) -> dict[str, Any]:
    """Lazy Ray Datasets ``train`` (and ``validation`` when rows are held out) of decoded
    inputs, from ``rows`` (a dataset with ``prompt_id``, ``image_index``, ``prompt`` and
    ``image``); with a ``cache`` (a run directory and a prefix), cached latents instead,
    encoded once and read back from the run's storage."""
    from selma_ray.experts.data import cached_latents, native_resolution

    base = loop["base"]
    size = loop["resolution"] or native_resolution(base)
    parts = {"train": False, "validation": True}
    datasets = {}
    for name, is_held_out in parts.items():
        if is_held_out and not held_out:
            continue
        center = is_held_out or loop["crop"] == "center" or cache is not None
        ds = rows.map_batches(
            _keep_rows,
            fn_kwargs={"keys": held_out, "held_out": is_held_out},
            batch_format="numpy",
            **DATA_TASKS,
        ).map_batches(
            decode_batch,
            fn_kwargs={"size": size, "center": center},
            # A whole block (one shard's rows) per call: a batch size would keep the read
            # from fusing with these maps, and every shard would wait whole in the store.
            batch_size=None,
            batch_format="numpy",
            **DATA_TASKS,
        )
        if cache is not None:
            flip = loop["random_flip"] and not is_held_out
            ds = cached_latents(ds, (cache[0], f"{cache[1]}/{name}"), base, flip, loop)
        # Workers iterate these inside the trials; their progress bars would only linger on
        # the driver's console (a stopped worker never closes them).
        ds.context.enable_progress_bars = False
        pace(ds.context)
        execution_options(ds.context.execution_options, loop)
        datasets[name] = ds
    return datasets


class LoopPacer(ExecutionCallback):
    """Lets a feed execution's scheduling loop take a step at most every ``LOOP_PERIOD_S``.

    Ray Data's loop (Ray 2.60) waits in ``ray.wait`` only while tasks are still running. Held
    back by the feed's object-store budget (a finished task whose output it may not read
    yet, or no task running while the consumer trains), it steps again at once: it spins a
    core in the process that iterates the dataset (the Train worker, or Ray Train's split
    coordinator), and there takes the GIL from the training step (on 2 CPUs, steps 8x
    slower while the epoch's execution lasted). Pacing costs a finished task at most
    ``LOOP_PERIOD_S`` before its output is read; a step that waited in ``ray.wait`` is not
    delayed further."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def on_execution_step(self, executor) -> None:
        rest = LOOP_PERIOD_S - (time.monotonic() - self._last)
        if rest > 0:
            time.sleep(rest)
        self._last = time.monotonic()


def pace(context) -> None:
    """Adds ``LoopPacer`` to a dataset's ``DataContext`` (once)."""
    if LoopPacer not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [
            *context.custom_execution_callback_classes,
            LoopPacer,
        ]


def execution_options(options, loop: dict[str, Any]):
    """Sets a feed dataset's Ray Data ``ExecutionOptions`` (and returns them):
    - order is kept, so that a seed gives the same batches, and Ray Train's splitter deals
      blocks in order to the rank with the fewest rows: every rank gets the same rows in
      every run and epoch (locality hints are ignored when order is kept);
    - the object store it may fill ahead of its consumer is ``feed_buffer_rows`` decoded
      rows, whatever the data size (Ray's default is a share of the whole store)."""
    size = loop["resolution"] or _size(loop["base"])
    options.preserve_order = True
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=loop["feed_buffer_rows"] * row_bytes(loop, size)
    )
    return options


def data_config(loop: dict[str, Any]):
    """Ray Train's ``DataConfig`` for an expert: the training set is split among the workers,
    the validation set is read whole by each. Ray Train replaces a dataset's execution
    options with these, so they are the feed's own (``execution_options``)."""
    from ray.train import DataConfig

    options = execution_options(DataConfig.default_ingest_options(), loop)
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def skill_files(run, files: list[str], skills: list[str]) -> dict[str, list[str]]:
    """For each skill, the committed image shards that may hold it (from their Parquet
    statistics, each footer read once): a skill's read then has no task per shard of the
    others."""
    from selma_ray.core import layout

    by_skill = layout.files_holding(run, files, "skill", skills)
    for skill, held in by_skill.items():
        if not held:
            raise RuntimeError(
                f"experts: no images for skill {skill!r} in the images stage's output"
            )
    return by_skill


def read_rows(run, files: list[str], skills: list[str]):
    """The rows (keys, prompt, PNG bytes) of ``skills`` (one, or a joint LoRA's several)
    from image shards (those ``skill_files`` keeps for them), read with small tasks and the
    skill filter pushed into the Parquet scan."""
    from ray.data.expressions import col

    from selma_ray.core import layout

    return layout.read_dataset(
        run,
        files,
        [*ROW_COLUMNS, "skill"],
        filter=col("skill").is_in(list(skills)),
        **READ_TASKS,
        whole_files=True,
    ).select_columns(ROW_COLUMNS)


def row_bytes(loop: dict[str, Any], size: int) -> int:
    """One decoded row: uint8 pixels (before a random crop, up to a third more), or cached
    latents (mean and std, twice when flips are cached)."""
    if loop["cache_latents"]:
        return 4 * (size // 8) ** 2 * 4 * 2 * (2 if loop["random_flip"] else 1)
    pixels = size * size * 3
    return pixels * 4 // 3 if loop["crop"] == "random" else pixels


def shard_bytes(rows: int, workers: int, loop: dict[str, Any], size: int) -> int:
    """What one worker's shard of ``rows`` rows holds decoded."""
    return -(-rows // workers) * row_bytes(loop, size)


def feed_mode(loop: dict[str, Any], rows: int, workers: int, size: int) -> str:
    if loop["feed"] != "auto":
        return loop["feed"]
    fits = shard_bytes(rows, workers, loop, size) <= loop["feed_memory_mb"] * 2**20
    return "memory" if fits else "stream"


# ---- the worker's side ------------------------------------------------------------------------
class Feed:
    """A Train worker's batches, epoch after epoch, from its shard of the training set.

    ``position`` is (epoch, batches taken in that epoch) after the last batch handed out;
    a feed started at a position yields exactly what a feed run from the start would have
    yielded from there on."""

    def __init__(
        self,
        shard,
        config: dict[str, Any],
        rank: int,
        position: tuple[int, int] = (0, 0),
        mode: str = "stream",
    ):
        if mode not in ("stream", "memory"):
            raise ValueError(f"feed mode must be stream or memory, got {mode!r}")
        self.shard, self.config, self.rank, self.mode = shard, config, rank, mode
        self.position = (int(position[0]), int(position[1]))
        self._rows: dict[str, Any] | None = None
        self.size = config["resolution"] or _size(config["base"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.start()

    def start(self) -> Iterator[dict[str, Any]]:
        """The model inputs from ``position`` on. With ``feed_prefetch_batches``, a thread
        starts reading batches now (the first epoch's read can overlap the model's loading),
        and keeps that many ahead of the trainer, so that each epoch's read starts while the
        trainer still steps through the last one's final batches.

        The thread holds decoded rows (uint8 pixels or latents); the model inputs (crops,
        flips, float pixels, token ids) are made here, in the trainer's thread, as each batch
        is taken: a millisecond or two of Python per batch that, in the thread, competed with
        the training step for the GIL (``bench/training_bench.py``: median step 84 vs 78 ms
        on one CPU core)."""
        from selma_ray.experts.data import load_tokenizers

        if not self.config.get("cache_latents"):
            # Here, not in the prefetch thread: loading them imports diffusers, whose lazy
            # modules fail ("cannot import name 'DiffusionPipeline'") when the trainer in the
            # main thread imports diffusers at the same time.
            load_tokenizers(self.config["base"])
        depth = self.config.get("feed_prefetch_batches", 0)
        batches = self._batches(*self.position)
        return self._hand_out(Ahead(batches, depth) if depth else batches)

    def _hand_out(self, source: Iterator[tuple[int, int, dict[str, Any]]]):
        try:
            c = self.config
            for epoch, index, batch in source:
                self.position = (epoch, index + 1)
                yield model_inputs(batch, c, epoch, self.size, c["crop"], c["random_flip"])
        finally:
            if isinstance(source, Ahead):
                source.close()
                # Until the thread has closed the Ray Data iterator, the feed's execution
                # runs on and holds its blocks in the object store.
                source.join(timeout=10.0)

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, index in the epoch, decoded rows) from ``(epoch, skip)`` on, forever."""
        while True:
            taken = 0
            for index, batch in enumerate(self._epoch(epoch)):
                taken += 1
                if index < skip:
                    continue
                yield epoch, index, batch
            if not taken:
                raise RuntimeError("this worker's training shard is empty; use fewer workers")
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        c = self.config
        seed = order_seed(c["seed"], c["skill"], epoch, self.rank)
        bs = c["batch_size"]
        if self.mode == "stream":
            blocks = self.shard.iter_batches(batch_size=None, batch_format="numpy")
            yield from shuffled(blocks, np.random.default_rng(seed), bs, c["shuffle_buffer"])
            return
        rows = self._held()
        n = len(rows["key"])
        order = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, bs):
            take = order[start : start + bs]
            yield {k: v[take] for k, v in rows.items()}

    def _held(self) -> dict[str, Any]:
        """The whole shard, read once (uint8 pixels or latents), in the worker."""
        if self._rows is None:
            parts = list(self.shard.iter_batches(batch_size=None, batch_format="numpy"))
            if not parts:
                raise RuntimeError("this worker's training shard is empty; use fewer workers")
            self._rows = {k: _concat([p[k] for p in parts]) for k in parts[0]}
            rows = len(self._rows["key"])
            log.info("experts: [%s] %d rows held in the worker", self.config["skill"], rows)
        return self._rows


def shuffled(
    blocks: Iterator[dict[str, np.ndarray]], rng: np.random.Generator, batch_size: int, buffer: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows drawn at random (from ``rng``) out of a buffer of at
    least ``buffer`` rows, refilled block by block; the last batch may be smaller.

    Each row is copied out of its block as it enters the buffer, so the buffer never keeps a
    block (a zero-copy view into the object store) alive: the feed's object-store budget is
    freed as soon as a block is read, and memory here is at most ``buffer`` rows plus one
    block. Every row is handed out exactly once per pass; the order depends only on the block
    order and ``rng``. Ray's ``local_shuffle_buffer_size`` batcher does the same job with a
    concatenation per batch: two to three times the time per batch of 4 small rows here.
    """
    if batch_size < 1 or buffer < 1:
        raise ValueError(f"batch_size and buffer must be at least 1, got {batch_size}, {buffer}")
    pool: list[dict[str, Any]] = []
    for block in blocks:
        pool.extend(_rows(block))
        while len(pool) >= buffer + batch_size:
            yield _draw(pool, rng, batch_size)
    while pool:
        yield _draw(pool, rng, min(batch_size, len(pool)))


def _rows(block: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """A block's rows, each value a copy (strings as they are: they own their data)."""
    columns = list(block.items())
    for i in range(len(columns[0][1]) if columns else 0):
        yield {k: _own(v[i]) for k, v in columns}


def _own(value: Any) -> Any:
    return value.copy() if isinstance(value, np.ndarray | np.generic) else value


def _draw(pool: list[dict[str, Any]], rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Removes ``n`` random rows from ``pool`` (swap with the last, pop) as one batch."""
    rows = []
    for _ in range(n):
        i = int(rng.integers(len(pool)))
        pool[i], pool[-1] = pool[-1], pool[i]
        rows.append(pool.pop())
    return {k: _stack([r[k] for r in rows]) for k in rows[0]}


def _stack(values: list[Any]) -> np.ndarray:
    """Equal-shaped arrays stacked; anything else (strings, ragged images) as objects."""
    arrays = all(isinstance(v, np.ndarray | np.generic) for v in values)
    if arrays and len({(v.dtype, v.shape) for v in values}) == 1 and values[0].dtype != object:
        return np.stack(values)
    return _objects(values)


class Ahead(Iterator[T]):
    """``items``, drawn by a background thread (started now) at most ``depth`` ahead of the
    consumer. An error in the thread is raised to the consumer; ``close()`` (or dropping this
    iterator) stops the thread at its next item, and closes ``items`` there."""

    def __init__(self, items: Iterator[T], depth: int):
        self._stop = threading.Event()  # first: ``__del__`` of a refused iterator uses it
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._slots: queue.Queue = queue.Queue(maxsize=depth)
        # The thread holds the queue, the event and ``items``, never ``self``: a dropped
        # iterator is collected, and its ``__del__`` stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(items, self._slots, self._stop),
            name="selma-feed-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __next__(self) -> T:
        if self._stop.is_set():  # ended, failed or closed: the thread puts nothing more
            raise StopIteration
        error, item = self._slots.get()
        if error is not None:
            self.close()
            raise error
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Waits (after ``close``) until the thread has stopped and closed ``items``; False
        if it is still running after ``timeout`` seconds (blocked in ``items``)."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def __del__(self) -> None:
        self.close()


_END = object()


def _produce(items: Iterator[Any], slots: queue.Queue, stop: threading.Event) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((None, item)):
                break
        else:
            put((None, _END))
    except BaseException as e:  # handed to the consumer, raised there
        put((e, None))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)
    return _objects([row for p in parts for row in p])


def _size(base: str) -> int:
    from selma_ray.experts.data import native_resolution

    return native_resolution(base)


def validation_batches(shard, config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The held-out rows as model inputs, ``validation_batch_size`` at a time."""
    size = config["resolution"] or _size(config["base"])
    for batch in shard.iter_batches(
        batch_size=config["validation_batch_size"], batch_format="numpy"
    ):
        yield model_inputs(batch, config, 0, size, "center", False)


def model_inputs(
    batch: dict[str, Any], config: dict[str, Any], epoch: int, size: int, crop: str, flip: bool
) -> dict[str, Any]:
    """``augment`` plus the prompts' token ids (unless the text was cached with the latents)."""
    from selma_ray.experts.data import token_ids

    out = augment(batch, config["seed"], config["skill"], epoch, size, crop, flip)
    return out if "hidden" in out else {**out, **token_ids(config["base"], batch["prompt"])}
