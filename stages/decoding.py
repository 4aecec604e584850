"""Decoding images on every core, in bounded memory.

- download streams the source's images through `ordered_map`: chunks of them go to worker processes to
  be checked, and come back in order to be written, at most two chunks per worker in flight.
- preprocess hands out `unordered_map` tasks that name rows of the raw parquet (dataformat.RawGroup):
  each worker reads them, decodes them, and writes the pixels into their place in the output file, so
  the stage's own process moves no image.
Either way memory holds a few chunks, however many images there are. The workers are spawned (the
stage's own threads - pyarrow's, MLflow's - make fork unsafe), so they import this module and the
stage's main module, which keep MLflow out of their imports. Below PARALLEL_MIN_IMAGES the work runs in
the stage's own process: starting workers would cost more.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from stages.dataformat import RawGroup, decode_rgb, read_raw_group

# A task's images: enough to amortise handing it out, few enough that the tasks share out evenly over the
# cores, and few enough bytes (encoded, or decoded) that the tasks in flight stay small.
CHUNK_IMAGES = 256
CHUNK_BYTES = 16 << 20
PARALLEL_MIN_IMAGES = 2_000

Result = TypeVar("Result")
Task = TypeVar("Task")


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spawned_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@contextmanager
def worker_pool(images: int) -> Iterator[ProcessPoolExecutor | None]:
    """One process per core for ordered_map or unordered_map over `images` images; None (this process)
    below PARALLEL_MIN_IMAGES."""
    if images < PARALLEL_MIN_IMAGES or cores() == 1:
        yield None
        return
    with spawned_pool(cores()) as pool:
        yield pool


def chunked(items: Iterable[tuple]) -> Iterator[list[tuple]]:
    """Lists of CHUNK_IMAGES items that end in (name, encoded bytes), fewer where they reach CHUNK_BYTES of
    encoded bytes first."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[-1])
        if len(chunk) >= CHUNK_IMAGES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ordered_map(fn: Callable[[list[tuple]], Result], chunks: Iterable[list[tuple]], pool: ProcessPoolExecutor | None) -> Iterator[tuple[list[tuple], Result]]:
    """(chunk, fn(chunk)) for every chunk, in order, with fn run in the pool's processes (in this one when
    None), two chunks per core in flight at most. A worker's error is raised here."""
    if pool is None:
        yield from ((chunk, fn(chunk)) for chunk in chunks)
        return
    pending = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(fn, chunk)))
        if len(pending) >= 2 * cores():
            chunk, result = pending.popleft()
            yield chunk, result.result()
    while pending:
        chunk, result = pending.popleft()
        yield chunk, result.result()


def unordered_map(fn: Callable[[Task], Result], tasks: list[Task], pool: ProcessPoolExecutor | None) -> Iterator[Result]:
    """fn(task) for every task, as they finish, in the pool's processes (in this one when None). A worker's
    error is raised here, and the tasks not started are dropped."""
    if pool is None:
        yield from map(fn, tasks)
        return
    futures = [pool.submit(fn, task) for task in tasks]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


# The workers' functions. An image comes as (name, encoded bytes): the name is what an error shows.

def check_decodes(images: list[tuple]) -> None:
    """Decode every image fully; a corrupt one raises, naming it."""
    for *_, name, data in images:
        decode_rgb(data, name)


def image_sizes(task: RawGroup) -> set[tuple[int, int]]:
    """The (width, height) of the task's images, from their headers alone."""
    return {Image.open(io.BytesIO(data)).size for _, data in read_raw_group(task)}


def decode_pixels(images: list[tuple], size: tuple[int, int], resample: int | None) -> bytes:
    """The images as uint8 3×H×W arrays, one after another, resized with `resample` to `size` (width,
    height) where they are not that size already."""
    out = []
    for *_, name, data in images:
        img = decode_rgb(data, name)
        if img.size != size:
            img = img.resize(size, resample)
        out.append(np.asarray(img).transpose(2, 0, 1).tobytes())
    return b"".join(out)


def decode_into(task: RawGroup, out: Path, start: int, size: tuple[int, int], resample: int | None) -> int:
    """Decode the task's images (decode_pixels) and write them in their place in the processed split `out`,
    whose pixels begin at byte `start`; the number written. Workers write their own parts of the file:
    the stage's process only hands out tasks."""
    pixels = decode_pixels(read_raw_group(task), size, resample)
    descriptor = os.open(out, os.O_WRONLY)
    try:
        os.pwrite(descriptor, pixels, start + task.position * 3 * size[0] * size[1])
    finally:
        os.close(descriptor)
    return len(task.rows)
