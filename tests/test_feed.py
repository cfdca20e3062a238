"""The training feed (``selma_ray.experts.feed``): the held-out split, the data hash, and the
seeded, shuffled, resumable batches a Train worker reads, in both feed modes, on a real local
Ray cluster reading Ray Datasets."""

from __future__ import annotations

import io
import itertools
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from selma_ray.config import load_config
from selma_ray.experts import feed

SKILL = "counting"


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def rows_table(n: int, width: int = 48, height: int = 40) -> pa.Table:
    return pa.table(
        {
            "prompt_id": [f"{SKILL}-{i:03d}" for i in range(n)],
            "image_index": [0] * n,
            "prompt": [f"prompt {i}" for i in range(n)],
            "image": [png(width, height, i) for i in range(n)],
        }
    )


def loop(**extra) -> dict:
    base = load_config("tiny", []).experts.model_dump()
    return {**base, "base": "tiny-sd", "seed": 0, "skill": SKILL, "batch_size": 4, **extra}


def test_the_held_out_rows_depend_on_seed_and_key_and_have_the_asked_size():
    keys = [f"k{i}" for i in range(20)]
    val = feed.choose_validation(keys, 0, SKILL, 0.1, None)
    assert len(val) == 2 and val == feed.choose_validation(
        list(reversed(keys)), 0, SKILL, 0.1, None
    )
    assert feed.choose_validation(keys, 1, SKILL, 0.1, None) != val
    assert len(feed.choose_validation(keys, 0, SKILL, 0.1, 5)) == 5  # count wins
    assert feed.choose_validation(keys, 0, SKILL, 0.0, None) == []
    assert len(feed.choose_validation(keys[:3], 0, SKILL, 0.01, None)) == 1  # at least one
    # A row's side of the split does not move when other rows come or go.
    assert set(feed.choose_validation(keys + ["new"], 0, SKILL, 0.0, 2)) & set(val)
    with pytest.raises(ValueError, match="leaves none to train on"):
        feed.choose_validation(keys[:2], 0, SKILL, 0.5, 2)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_split_and_hash_at_scale_agree_with_the_rule_and_ignore_order(cluster):
    table = rows_table(12)
    ds = ray.data.from_arrow(table).repartition(3)
    rows, digest = feed.scan(ds)
    held_out, prompts = feed.split_validation(ds, rows, 0, SKILL, 0.25, None)
    keys = [f"{p}/0" for p in table.column("prompt_id").to_pylist()]
    assert rows == 12 and held_out == feed.choose_validation(keys, 0, SKILL, 0.25, None)
    assert prompts == [f"prompt {keys.index(k)}" for k in held_out]
    reversed_ds = ray.data.from_arrow(table.take(list(range(11, -1, -1))))
    assert feed.scan(reversed_ds) == (12, digest)
    changed = table.set_column(
        3, "image", pa.array([png(48, 40, 99)] + [png(48, 40, i) for i in range(1, 12)])
    )
    hashes = {feed.scan(ray.data.from_arrow(t))[1] for t in (table, changed, table.slice(1))}
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)
    # joining prompt and image differently is another data set
    moved = pa.table({"prompt": ["p"], "image": [b"01"]})
    joined = pa.table({"prompt": ["p0"], "image": [b"1"]})
    assert feed.scan(ray.data.from_arrow(moved)) != feed.scan(ray.data.from_arrow(joined))


def test_a_skills_read_skips_the_shards_whose_statistics_exclude_it(tmp_path):
    import pyarrow.parquet as pq

    from selma_ray.core.rundir import RunDir

    table = rows_table(2)
    for name, skills in {"a": ["counting", "counting"], "b": ["spatial", "style"]}.items():
        pq.write_table(table.append_column("skill", pa.array(skills)), tmp_path / f"{name}.parquet")
    pq.write_table(  # no statistics: kept, the pushed-down filter decides
        table.append_column("skill", pa.array(["style", "style"])),
        tmp_path / "c.parquet",
        write_statistics=False,
    )
    files = [str(tmp_path / f"{n}.parquet") for n in "abc"]
    run = RunDir(tmp_path)
    assert feed.skill_files(run, files, ["counting", "spatial"]) == {
        "counting": [files[0], files[2]],
        "spatial": files[1:],
    }
    with pytest.raises(RuntimeError, match="no images for skill 'zebra'"):
        feed.skill_files(run, files[:2], ["counting", "zebra"])


def test_a_joint_loras_read_takes_the_rows_of_its_skills_and_no_others(cluster, tmp_path):
    import pyarrow.parquet as pq

    from selma_ray.core.rundir import RunDir

    table = rows_table(9).append_column("skill", pa.array(["a", "b", "c"] * 3))
    pq.write_table(table, tmp_path / "part.parquet")
    rows = feed.read_rows(RunDir(tmp_path), [str(tmp_path / "part.parquet")], ["a", "c"])
    got = sorted(str(r["prompt_id"]) for r in rows.take_all())
    assert got == [f"{SKILL}-{i:03d}" for i in range(9) if i % 3 != 1]


def test_each_shard_is_read_and_decoded_in_one_task_within_the_feed_buffer(cluster, tmp_path):
    """The read fuses with the maps after it (the shard's bytes never wait whole in the object
    store), and the read-ahead budget is ``feed_buffer_rows`` decoded rows, also under Ray Train."""
    import pyarrow.parquet as pq

    from selma_ray.core.rundir import RunDir

    table = rows_table(12).append_column("skill", pa.array([SKILL] * 12))
    for i in range(3):  # fewer files than Ray Data's target parallelism: it would split them
        pq.write_table(table.slice(4 * i, 4), tmp_path / f"part-{i}.parquet")
    run = RunDir(tmp_path)
    rows = feed.read_rows(run, [str(tmp_path / f"part-{i}.parquet") for i in range(3)], [SKILL])
    assert feed.scan(rows)[0] == 12
    digests = rows.select_columns(["prompt", "image"]).map_batches(
        feed._digest_sum, batch_format="numpy", batch_size=None, **feed.DATA_TASKS
    )  # as feed.scan
    assert "ReadParquet->MapBatches(_digest_sum)" in digests.materialize().stats()
    config = loop(feed_buffer_rows=5, resolution=16)
    train = feed.training_datasets(rows, [], config)["train"]
    assert sum(len(b["key"]) for b in train.iter_batches(batch_size=5)) == 12
    assert "ReadParquet->MapBatches(_keep_rows)->MapBatches(decode_batch)" in train.stats()
    budget = 5 * 16 * 16 * 3  # rows of uint8 pixels, centre-cropped
    assert train.context.execution_options.resource_limits.object_store_memory == budget
    options = feed.data_config(config)._user_execution_options  # what Ray Train applies
    assert options.preserve_order and options.resource_limits.object_store_memory == budget


def batches(config: dict, mode: str, count: int, position=(0, 0), rows: int = 10):
    ds = feed.training_datasets(ray.data.from_arrow(rows_table(rows)), [], config)["train"]
    stream = feed.Feed(ds, config, rank=0, position=position, mode=mode)
    source = iter(stream)
    got = list(itertools.islice(source, count))
    source.close()  # stops its prefetch thread, which would take CPU from the next test
    return got, stream.position


def keys_of(got: list[dict]) -> list[list[str]]:
    return [[str(k) for k in b["key"]] for b in got]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_epochs_reshuffle_and_the_seed_fixes_every_batch(cluster, mode):
    config = loop(crop="random", random_flip=True, shuffle_buffer=16)
    got, position = batches(config, mode, 6)  # 10 rows, batches of 4: 3 a epoch
    assert position == (1, 3)
    first, second = keys_of(got[:3]), keys_of(got[3:])
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == sorted(set(sum(first, [])))
    assert first != second  # same rows, another order
    again, _ = batches(config, mode, 6)
    assert keys_of(again) == keys_of(got)
    for a, b in zip(got, again, strict=True):
        assert np.array_equal(a["pixel_values"], b["pixel_values"])  # same crops and flips
    other, _ = batches({**config, "seed": 1}, mode, 6)
    assert keys_of(other) != keys_of(got)
    assert got[0]["pixel_values"].dtype == np.float32
    assert got[0]["pixel_values"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_feed_started_at_a_position_continues_the_same_order(cluster, mode):
    config = loop(crop="random", random_flip=True)
    straight, _ = batches(config, mode, 7)
    resumed, position = batches(config, mode, 3, position=(1, 1))  # after 4 batches
    assert position == (2, 1)
    assert keys_of(resumed) == keys_of(straight[4:])
    for a, b in zip(resumed, straight[4:], strict=True):
        assert np.array_equal(a["pixel_values"], b["pixel_values"])


def test_crops_and_flips_are_drawn_per_row_epoch_and_seed():
    image = np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3)
    batch = {"key": np.asarray(["a/0", "b/0"], dtype=object), "image": np.stack([image, image])}

    def run(seed: int, epoch: int) -> np.ndarray:
        out = feed.augment(batch, seed, SKILL, epoch, 32, "random", True)
        return out["pixel_values"]

    assert np.array_equal(run(0, 0), run(0, 0))
    assert not np.array_equal(run(0, 0)[0], run(0, 0)[1])  # two rows, two draws
    assert not np.array_equal(run(0, 0), run(0, 1))
    assert not np.array_equal(run(0, 0), run(1, 0))
    centre = feed.augment(batch, 0, SKILL, 0, 32, "center", False)
    assert centre["crop_top_left"].tolist() == [[4, 8], [4, 8]]
    expected = image[4:36, 8:40].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    assert np.allclose(centre["pixel_values"][0], expected)


def test_the_shuffle_buffer_hands_each_row_out_once_and_keeps_no_block_alive():
    """The stream feed's buffer copies rows out of each block: a block (in the worker, a view
    into the object store) is dropped once read, whatever rows of it wait in the buffer."""
    import gc
    import weakref

    alive: list[weakref.ref] = []

    def blocks():
        for j in range(5):
            pixels = np.full((6, 2, 2, 3), j, dtype=np.uint8)
            alive.append(weakref.ref(pixels))
            keys = np.asarray([f"r{j}-{i}" for i in range(6)], dtype=object)
            yield {"key": keys, "image": pixels, "size": np.arange(6) + 10 * j}

    rng = np.random.default_rng(0)
    got = []
    for batch in feed.shuffled(blocks(), rng, batch_size=4, buffer=8):
        gc.collect()
        assert sum(ref() is not None for ref in alive) <= 1  # only the block being read
        got.append(batch)
    keys = [str(k) for b in got for k in b["key"]]
    assert sorted(keys) == sorted(f"r{j}-{i}" for j in range(5) for i in range(6))
    assert keys != sorted(keys)  # drawn at random, not in block order
    assert [len(b["key"]) for b in got] == [4] * 7 + [2]
    assert got[0]["image"].dtype == np.uint8 and got[0]["image"].shape == (4, 2, 2, 3)
    for b in got:  # each row's columns stay together
        for key, image, size in zip(b["key"], b["image"], b["size"], strict=True):
            j, i = map(int, key[1:].split("-"))
            assert image.max() == j and size == 10 * j + i
    again = list(feed.shuffled(blocks(), np.random.default_rng(0), 4, 8))
    assert [list(b["key"]) for b in again] == [list(b["key"]) for b in got]


def test_auto_holds_small_shards_in_the_worker_and_streams_large_ones():
    small = loop(feed="auto", feed_memory_mb=1)
    assert feed.feed_mode(small, rows=10, workers=1, size=32) == "memory"
    assert feed.feed_mode(small, rows=1000, workers=1, size=512) == "stream"
    assert feed.feed_mode({**small, "feed": "stream"}, rows=1, workers=1, size=8) == "stream"


def test_each_rank_gets_the_same_rows_in_every_run_and_epoch(cluster):
    """Ray Train's split of the training set among an expert's workers, as the experts stage
    configures it: tasks finishing out of order still deal every rank the same rows."""
    import random
    import threading
    import time

    def jitter(batch):
        time.sleep(random.random() * 0.1)
        return batch

    rows = rows_table(24).select(["prompt_id"]).to_pylist()
    ds = ray.data.from_items(rows, override_num_blocks=24).map_batches(jitter, batch_size=1)

    def split() -> list[list[list[str]]]:
        iterators = feed.data_config(loop()).configure(
            {"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None
        )
        seen: list[list[list[str]]] = [[], []]

        def read(rank: int) -> None:
            for _ in range(2):  # two epochs
                rows = iterators[rank]["train"].iter_rows()
                seen[rank].append([str(r["prompt_id"]) for r in rows])

        threads = [threading.Thread(target=read, args=(rank,)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return seen

    first = split()
    assert all(split() == first for _ in range(2))
    for rank in (0, 1):
        assert first[rank][0] == first[rank][1]  # every epoch
    assert len(first[0][0]) == len(first[1][0]) == 12
    assert not set(first[0][0]) & set(first[1][0])


def test_prefetching_hands_out_the_same_batches_and_counts_only_those_taken(cluster):
    """The prefetch thread changes when batches are prepared, never which: the same batches as
    without it, and ``position`` counts the batches the trainer took, not those prepared."""
    config = loop(crop="random", random_flip=True)
    ahead, position = batches({**config, "feed_prefetch_batches": 16}, "stream", 5)
    plain, _ = batches({**config, "feed_prefetch_batches": 0}, "stream", 5)
    assert keys_of(ahead) == keys_of(plain)
    for a, b in zip(ahead, plain, strict=True):
        assert np.array_equal(a["pixel_values"], b["pixel_values"])
    assert position == (1, 2)  # 3 batches an epoch; 16 were asked ahead


def test_the_prefetch_thread_holds_uint8_rows_and_the_trainers_thread_makes_inputs(
    cluster, monkeypatch
):
    """What waits in the prefetch queue is decoded uint8 rows, never float32 pixels, and the
    model inputs are made in the thread that takes the batch (in the prefetch thread they
    took the GIL from the training step)."""
    made_in, seen = [], []
    real = feed.model_inputs

    def recording(batch, *args):
        made_in.append(threading.current_thread())
        seen.append(batch["image"].dtype)
        return real(batch, *args)

    monkeypatch.setattr(feed, "model_inputs", recording)
    got, _ = batches({**loop(crop="random"), "feed_prefetch_batches": 4}, "stream", 3)
    assert made_in == [threading.current_thread()] * 3
    assert seen == [np.dtype(np.uint8)] * 3
    assert got[0]["pixel_values"].dtype == np.float32


def test_ahead_raises_the_producers_error_and_stops_it_when_closed():
    def failing():
        yield 1
        raise ValueError("broken shard")

    got = feed.Ahead(failing(), 4)
    assert next(got) == 1
    with pytest.raises(ValueError, match="broken shard"):
        next(got)
    with pytest.raises(StopIteration):  # a failed iterator stays ended, never blocks
        next(got)

    closed, started = [], []

    def endless():
        started.append(True)
        try:
            yield from itertools.count()
        finally:
            closed.append(True)

    got = feed.Ahead(endless(), 2)
    for _ in range(50):  # the thread starts with the iterator, before anything is asked
        if started:
            break
        time.sleep(0.05)
    assert started == [True]
    assert [next(got) for _ in range(3)] == [0, 1, 2]
    got.close()
    assert got.join(timeout=10)  # the thread sees the stop at its next put (within 0.1 s)
    assert closed == [True]  # and has closed its items: joined means the source is shut
    assert list(feed.Ahead(iter([1, 2]), 1)) == [1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        feed.Ahead(iter([]), 0)


def test_a_feed_held_back_by_its_budget_does_not_spin_a_core(cluster, tmp_path):
    """While the trainer is busy and the feed's budget is full, Ray Data's scheduling loop
    would step without waiting and take a core (and the GIL) from the training process
    (``LoopPacer``). The process that iterates must stay mostly idle while its consumer is."""
    import pyarrow.parquet as pq

    from selma_ray.core.rundir import RunDir

    table = rows_table(48, 16, 16).append_column("skill", pa.array([SKILL] * 48))
    files = []
    for i in range(12):
        files.append(str(tmp_path / f"part-{i:02d}.parquet"))
        pq.write_table(table.slice(4 * i, 4), files[-1])
    rows = feed.read_rows(RunDir(tmp_path), files, [SKILL])
    train = feed.training_datasets(rows, [], loop(feed_buffer_rows=4, resolution=16))["train"]
    assert feed.LoopPacer in train.context.custom_execution_callback_classes
    wall, cpu = time.perf_counter(), time.process_time()
    taken = 0
    for batch in train.iter_batches(batch_size=4):
        taken += len(batch["key"])
        time.sleep(0.15)  # the training step
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert taken == 48
    assert cpu < 0.3 * wall, f"the iterating process used {cpu:.2f} s of CPU in {wall:.2f} s"
