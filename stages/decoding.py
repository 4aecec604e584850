"""Decoding images on every core, in bounded memory.

`ordered_map` runs a function over chunks of images in worker processes and yields the results in order,
with at most two chunks per worker in flight: memory holds a few chunks, however many images there are.
The workers are spawned (the stage's own threads - pyarrow's, MLflow's - make fork unsafe), so they
import this module and the stage's main module, which keep MLflow out of their imports.
Below PARALLEL_MIN_IMAGES the chunks run in the stage's own process: starting workers would cost more.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import TypeVar

import numpy as np
from PIL import Image

from stages.dataformat import decode_rgb

CHUNK_IMAGES = 256  # per task: large enough to amortise sending it, small enough to share the work out
PARALLEL_MIN_IMAGES = 2_000

Item = TypeVar("Item")
Result = TypeVar("Result")


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spawned_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


@contextmanager
def worker_pool(images: int) -> Iterator[ProcessPoolExecutor | None]:
    """One process per core for ordered_map over `images` images; None (this process) below PARALLEL_MIN_IMAGES."""
    if images < PARALLEL_MIN_IMAGES or cores() == 1:
        yield None
        return
    with spawned_pool(cores()) as pool:
        yield pool


def chunked(items: Iterable[Item]) -> Iterator[list[Item]]:
    """Lists of CHUNK_IMAGES items."""
    iterator = iter(items)
    while chunk := list(islice(iterator, CHUNK_IMAGES)):
        yield chunk


def ordered_map(fn: Callable[[list[Item]], Result], chunks: Iterable[list[Item]], pool: ProcessPoolExecutor | None) -> Iterator[tuple[list[Item], Result]]:
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


# The workers' functions take items that end in (name, encoded bytes): the name is what an error shows.

def check_decodes(images: list[tuple]) -> None:
    """Decode every image fully; a corrupt one raises, naming it."""
    for *_, name, data in images:
        decode_rgb(data, name)


def image_sizes(images: list[tuple]) -> set[tuple[int, int]]:
    """The (width, height) of the images, from their headers alone."""
    return {Image.open(io.BytesIO(data)).size for *_, name, data in images}


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
