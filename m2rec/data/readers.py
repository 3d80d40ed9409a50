"""Readers for interaction logs: RecBole atomic files, raw MovieLens ml-100k / ml-1m, and the ml-100k
that ships inside the ``recbole`` wheel.

Every reader returns :class:`RawInteractions` (raw string ids, row order kept) plus the item texts; the
preprocessing (k-core, chronological order, id remapping, splits) is in ``m2rec.data.preprocess``.
File formats follow RecBole's atomic-file documentation (typed ``name:type`` headers, tab-separated)
and the MovieLens READMEs (ml-100k ``u.data``/``u.item``, ml-1m ``ratings.dat``/``movies.dat``).
Any malformed line raises :class:`DataFormatError` naming the file and line.
"""
from __future__ import annotations

import codecs
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import DataFormatError

PathLike = Union[str, Path]

# RecBole's atomic-file field types (https://recbole.io/docs/user_guide/data/atomic_files.html).
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")

# The 19 genre flags of ml-100k's u.item, in file order (MovieLens ml-100k README; u.genre lists them).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


@dataclass
class RawInteractions:
    """An interaction log as read: one entry per row, raw ids as strings, file row order kept.

    ``timestamps`` is None when the file has no time column (rows are then taken to be in time order).
    ``item_texts`` maps raw item ids to a short description (title, year, genres, ...); items missing
    from it have no text.
    """

    name: str
    source: str
    users: List[str]
    items: List[str]
    timestamps: Optional[List[float]]
    item_texts: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


# ----------------------------------------------------------------------------------------------
# line reading with errors that name the file and the line


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (expected a Python codec name such as "
                         f"'utf-8' or 'latin-1')") from None


def read_lines(path: PathLike, encoding: str) -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line, without the line ending.

    Each line is decoded on its own so a decoding error names its line.
    """
    _check_encoding(encoding)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    path, f"cannot decode byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} as "
                          f"{encoding} (is the file in another encoding?)", number) from None
            text = text.rstrip("\r\n")
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # UTF-8 byte-order mark
            if text.strip():
                yield number, text


def _parse_float(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(path, f"column {column!r}: {text!r} is not a number", line) from None
    if not math.isfinite(value):
        raise DataFormatError(path, f"column {column!r}: {text!r} is not a finite number", line)
    return value


def _check_id(path: Path, line: int, column: str, text: str) -> str:
    text = text.strip()
    if not text:
        raise DataFormatError(path, f"column {column!r} is empty", line)
    return text


# ----------------------------------------------------------------------------------------------
# RecBole atomic files


_TYPED_FIELD = re.compile(r"[^\s,;:|]+:(?:" + "|".join(ATOMIC_TYPES) + r")")


def _check_tab_separated(path: Path, line: int, text: str) -> None:
    """A header such as ``user_id:token,item_id:token`` parses as one oddly named column; say that the
    file must be tab-separated instead of reporting the columns it then seems to lack."""
    if "\t" in text:
        return
    for sep, name in ((",", "commas"), (";", "semicolons"), ("|", "'|'"), (" ", "spaces")):
        cells = [c for c in text.strip().split(sep) if c.strip()]
        if len(cells) > 1 and all(_TYPED_FIELD.fullmatch(c.strip()) for c in cells):
            raise DataFormatError(path, f"the header is separated by {name}; RecBole atomic files must be "
                                        f"tab-separated (header e.g. 'user_id:token<TAB>item_id:token')", line)


def _parse_atomic_header(path: Path, line: int, text: str) -> List[Tuple[str, str]]:
    _check_tab_separated(path, line, text)
    columns = []
    for cell in text.split("\t"):
        name, sep, kind = cell.strip().rpartition(":")
        if not sep or not name:
            raise DataFormatError(path, f"header field {cell!r} is not of the form name:type "
                                        f"(type one of {', '.join(ATOMIC_TYPES)})", line)
        if kind not in ATOMIC_TYPES:
            raise DataFormatError(path, f"header field {cell!r} has unknown type {kind!r} "
                                        f"(expected one of {', '.join(ATOMIC_TYPES)})", line)
        columns.append((name, kind))
    return columns


def read_atomic_table(path: PathLike, required: Sequence[str] = (), encoding: str = "utf-8"
                      ) -> Tuple[List[Tuple[str, str]], Iterator[Tuple[int, List[str]]]]:
    """Read a tab-separated atomic file: returns its typed columns and an iterator of
    ``(line_number, cells)``. Raises if a ``required`` column is missing or a row has the wrong number
    of fields."""
    path = Path(path)
    lines = read_lines(path, encoding)
    try:
        first_line, header = next(lines)
    except StopIteration:
        raise DataFormatError(path, "file is empty (expected a typed header such as "
                                    "'user_id:token<TAB>item_id:token')", 1) from None
    columns = _parse_atomic_header(path, first_line, header)
    names = [name for name, _ in columns]
    for name in required:
        if name not in names:
            raise DataFormatError(path, f"missing column {name!r} (header has {', '.join(names)})",
                                  first_line)

    def rows() -> Iterator[Tuple[int, List[str]]]:
        for number, text in lines:
            cells = text.split("\t")
            if len(cells) != len(columns):
                raise DataFormatError(path, f"expected {len(columns)} tab-separated fields "
                                            f"({', '.join(names)}), got {len(cells)}", number)
            yield number, cells

    return columns, rows()


def _atomic_item_text(record: Dict[str, str]) -> str:
    """Item text from an atomic ``.item`` row: title, year, genres/categories, then description."""
    title = next((record[k] for k in ("movie_title", "title", "name", "item_name") if record.get(k)), "")
    year = next((record[k] for k in ("release_year", "year") if record.get(k)), "")
    genres = next((record[k] for k in ("class", "genre", "genres", "categories", "category")
                   if record.get(k)), "")
    extra = [record[k] for k in ("brand", "description") if record.get(k)]
    parts = []
    if title:
        parts.append(f"{title} ({year})" if year else title)
    elif year:
        parts.append(year)
    if genres:
        parts.append("Genres: " + ", ".join(genres.split()))
    parts.extend(extra)
    if not parts:  # unknown schema: every non-id text column, in file order
        parts = [v for k, v in record.items() if k != "item_id" and v]
    return ". ".join(p.strip() for p in parts if p.strip())


def read_atomic(inter_path: PathLike, item_path: Optional[PathLike] = None, name: Optional[str] = None,
                encoding: str = "utf-8") -> RawInteractions:
    """Read a RecBole ``.inter`` file (columns ``user_id``, ``item_id``; ``timestamp`` optional) and,
    when present, the ``.item`` file next to it for the item texts."""
    inter_path = Path(inter_path)
    columns, rows = read_atomic_table(inter_path, required=("user_id", "item_id"), encoding=encoding)
    index = {n: i for i, (n, _) in enumerate(columns)}
    float_columns = [(n, i) for n, i in index.items() if columns[i][1] == "float"]
    i_user, i_item, i_time = index["user_id"], index["item_id"], index.get("timestamp")
    users, items, times = [], [], [] if i_time is not None else None
    for number, cells in rows:
        users.append(_check_id(inter_path, number, "user_id", cells[i_user]))
        items.append(_check_id(inter_path, number, "item_id", cells[i_item]))
        for column, i in float_columns:  # validate every number (rating, timestamp, ...)
            if cells[i].strip() or column == "timestamp":
                value = _parse_float(inter_path, number, column, cells[i])
                if i == i_time:
                    times.append(value)
    if item_path is None:
        candidate = inter_path.with_suffix(".item")
        item_path = candidate if candidate.is_file() else None
    texts = read_atomic_item_texts(item_path, encoding) if item_path is not None else {}
    return RawInteractions(name or inter_path.stem, str(inter_path), users, items, times, texts)


def read_atomic_item_texts(path: PathLike, encoding: str = "utf-8") -> Dict[str, str]:
    path = Path(path)
    columns, rows = read_atomic_table(path, required=("item_id",), encoding=encoding)
    names = [n for n, _ in columns]
    texts = {}
    for number, cells in rows:
        record = {n: c.strip() for n, c in zip(names, cells)}
        item = _check_id(path, number, "item_id", record["item_id"])
        texts[item] = _atomic_item_text(record)
    return texts


# ----------------------------------------------------------------------------------------------
# raw MovieLens


def _split_fields(path: Path, number: int, text: str, sep: str, n: int, names: str) -> List[str]:
    cells = text.split(sep)
    if len(cells) != n:
        raise DataFormatError(path, f"expected {n} {sep!r}-separated fields ({names}), got {len(cells)}",
                              number)
    return cells


def _read_rating_rows(path: Path, sep: str, encoding: str) -> Tuple[List[str], List[str], List[float]]:
    users, items, times = [], [], []
    for number, text in read_lines(path, encoding):
        user, item, rating, stamp = _split_fields(path, number, text, sep, 4,
                                                  "user id, item id, rating, timestamp")
        users.append(_check_id(path, number, "user id", user))
        items.append(_check_id(path, number, "item id", item))
        _parse_float(path, number, "rating", rating)
        times.append(_parse_float(path, number, "timestamp", stamp))
    return users, items, times


def read_movielens_100k(directory: PathLike, encoding: str = "latin-1") -> RawInteractions:
    """Raw ml-100k: ``u.data`` (user, item, rating, timestamp; tab-separated) and ``u.item``
    (``|``-separated: id, title (with year), release date, video date, URL, 19 genre flags)."""
    directory = Path(directory)
    users, items, times = _read_rating_rows(directory / "u.data", "\t", encoding)
    texts: Dict[str, str] = {}
    item_file = directory / "u.item"
    if item_file.is_file():
        n_fields = 5 + len(ML100K_GENRES)
        for number, text in read_lines(item_file, encoding):
            cells = _split_fields(item_file, number, text, "|", n_fields,
                                  "id, title, release date, video release date, URL, 19 genre flags")
            flags = cells[5:]
            if any(f.strip() not in ("0", "1") for f in flags):
                raise DataFormatError(item_file, "genre flags must be 0 or 1", number)
            genres = [g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1" and g != "unknown"]
            title = cells[1].strip()
            texts[_check_id(item_file, number, "movie id", cells[0])] = (
                title + (". Genres: " + ", ".join(genres) if genres else ""))
    return RawInteractions("ml-100k", str(directory), users, items, times, texts)


def read_movielens_1m(directory: PathLike, encoding: str = "latin-1") -> RawInteractions:
    """Raw ml-1m: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp) and ``movies.dat``
    (MovieID::Title::Genres, genres ``|``-separated)."""
    directory = Path(directory)
    users, items, times = _read_rating_rows(directory / "ratings.dat", "::", encoding)
    texts: Dict[str, str] = {}
    movie_file = directory / "movies.dat"
    if movie_file.is_file():
        for number, text in read_lines(movie_file, encoding):
            movie, title, genres = _split_fields(movie_file, number, text, "::", 3,
                                                 "movie id, title, genres")
            genre_list = [g for g in genres.strip().split("|") if g]
            texts[_check_id(movie_file, number, "movie id", movie)] = (
                title.strip() + (". Genres: " + ", ".join(genre_list) if genre_list else ""))
    return RawInteractions("ml-1m", str(directory), users, items, times, texts)


# ----------------------------------------------------------------------------------------------
# finding a data set from a name or a path


def recbole_ml100k_dir() -> Optional[Path]:
    """The ml-100k atomic files bundled in the installed ``recbole`` wheel, or None."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / "ml-100k"
        if (candidate / "ml-100k.inter").is_file():
            return candidate
    return None


def read_directory(directory: PathLike) -> RawInteractions:
    """Recognise the layout of a data directory: atomic files, raw ml-100k or raw ml-1m."""
    directory = Path(directory)
    if (directory / "u.data").is_file():
        return read_movielens_100k(directory)
    if (directory / "ratings.dat").is_file():
        return read_movielens_1m(directory)
    inters = sorted(directory.glob("*.inter"))
    preferred = directory / f"{directory.name}.inter"
    if preferred.is_file():
        return read_atomic(preferred, name=directory.name)
    if len(inters) == 1:
        return read_atomic(inters[0], name=directory.name)
    if len(inters) > 1:
        raise ValueError(f"{directory}: several .inter files ({', '.join(p.name for p in inters)}); "
                         f"pass the one to use")
    raise ValueError(f"{directory}: no data found (expected a RecBole atomic <name>.inter file, "
                     f"ml-100k's u.data, or ml-1m's ratings.dat)")


def read_raw(data: PathLike) -> RawInteractions:
    """Read a data set given by name (``ml-100k`` = the copy inside the recbole wheel) or by path
    (a directory, or an ``.inter`` file)."""
    text = str(data)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            return read_directory(path)
        if path.suffix == ".inter":
            return read_atomic(path)
        raise ValueError(f"{path}: not a data directory or a RecBole .inter file")
    if text == "ml-100k":
        directory = recbole_ml100k_dir()
        if directory is None:
            raise ValueError("--data ml-100k reads the copy inside the recbole wheel, and recbole is not "
                             "installed: run 'pip install --no-deps recbole==1.2.1' (its own dependencies are "
                             "not needed; 'python3 tasks.py setup' does this), or pass --data PATH to a "
                             "MovieLens directory")
        return read_atomic(directory / "ml-100k.inter", name="ml-100k")
    raise ValueError(f"--data {text!r}: not an existing path and not a known data set name "
                     f"(known: ml-100k, synthetic; other data sets are given by path)")
