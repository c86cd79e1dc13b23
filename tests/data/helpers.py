"""Image files, tables and WebDataset shards generated inside a test's tmp_path."""

import csv
import io
import json
import tarfile

import numpy as np
from PIL import Image

MODES = ("L", "RGBA", "P", "RGB")


def random_image(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] | None = None) -> Image.Image:
    """Random pixels in `mode`, of a random odd size unless given (width, height)."""
    width, height = size or (int(rng.integers(5, 40)) * 2 + 1, int(rng.integers(5, 40)) * 2 + 1)
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGBA")
    return image.convert("P") if mode == "P" else image.convert(mode)


def image_bytes(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def random_caption(rng: np.random.Generator) -> str:
    words = ["dog", "cat", "red,", "tree", "on", "a", "the", "blue", "river", 'a 12" record', "café"]
    return " ".join(rng.choice(words, size=int(rng.integers(2, 7)))) + f" #{int(rng.integers(1_000_000))}"


def write_table(path, rows: list[dict]) -> None:
    """Rows as .csv, .tsv or .jsonl, chosen by the suffix of `path`."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    columns = list(rows[0]) if rows else ["image", "caption"]
    if path.suffix == ".tsv":  # unquoted, as TSV files usually are
        lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)


def write_shard(path, samples: list[tuple[str, bytes, str, str]]) -> None:
    """A WebDataset shard: for each (key, image bytes, image extension, caption) a key.EXT and a key.txt member."""
    with tarfile.open(path, "w") as archive:
        for key, data, extension, caption in samples:
            for name, payload in ((f"{key}.{extension}", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
