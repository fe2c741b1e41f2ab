"""Global prefix keys and the prefix-aware shuffle of a Dask DataFrame (BatchLLM's partitioning).

The engine shares a prefix only among the requests of one `Engine.generate`
call, that is, of one partition.  Rows that share a prefix must therefore land
in the same partition, wherever they start in the dataframe:

1. `tokenize_partition` turns each row's prompt into token ids once, on the
   workers; the ids travel with the row from then on (an Arrow list column).
2. `partition_stats` hashes each row's leading token blocks at lengths
   `block * 2**j` (16, 32, 64, ... tokens) and counts the hashes of its
   partition.  The counts of every partition come back to the client
   (`compute_plan`, eagerly: see below) and `build_plan` turns them into a
   `PrefixPlan`: a prefix is *shared* when two or
   more rows anywhere have it; a row's prefix key is its longest shared
   prefix, else the row is unshared.
3. The plan lays the prefix groups (keys) on a line of estimated cost (prompt
   tokens after sharing plus `max_tokens` per row), groups with a common
   shallower prefix side by side, and cuts the line into equal pieces, at
   least `npartitions` (one per GPU worker) and enough that a piece costs at
   most `partition_tokens` (`DEFAULT_PARTITION_TOKENS`: bounded partitions,
   so that a worker lost costs minutes, not the job): a group that fits in a piece goes whole to the piece holding its
   middle; a larger group, and the unshared rows, are cut where the pieces
   end, so a big group fills whole partitions (pieces of one partition's
   cost) plus the remainders at its two ends.  Every partition's cost is
   then within half a group of the mean.
   `assign_partitions` gives every row its target partition.
4. `shuffle_to_plan` moves the rows with Dask's own shuffle (`set_index` on
   the target with explicit divisions: exact placement, no hashing collisions).

The plan is computed when the job is built, as Dask's `set_index` computes its
divisions: the shuffle's graph needs the number of output partitions, which
depends on the job's cost.  The prompts are therefore tokenized twice, once
for the counts and once inside the job's graph.  That is deliberate: a fast
tokenizer encodes about a million tokens per second per core, a small share of
generating them, while persisting the tokenized frame between the two would
hold every row of the job in the cluster's memory for its whole duration,
which is what bounded partitions are there to avoid.

The original index is stashed in columns before the shuffle and restored by
the partition runner.  Everything here is pandas and numpy: no torch.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

TOKENS = "_bl_tokens"        # token ids of the prompt (int32 bytes), null for a bad row
ERROR = "_bl_error"          # why a row cannot run (str), None otherwise
KEY = "_bl_prefix_key"       # hash of the row's longest shared prefix, 0 when unshared
KEY_LEN = "_bl_prefix_len"   # length in tokens of that prefix
TARGET = "_bl_partition"     # the partition the row runs in
INDEX_PREFIX = "_bl_index_"  # the original index levels, stashed across the shuffle
INTERNAL = (TOKENS, ERROR, KEY, KEY_LEN, TARGET)
# Token ids travel as Arrow binary (int32 little-endian): an Arrow list type does not survive
# distributed's P2P shuffle (it cannot rebuild the pandas dtype from its metadata string).
TOKENS_DTYPE = pd.ArrowDtype(pa.binary())
_STATS_META = pd.DataFrame({c: pd.Series([], dtype="int64")
                            for c in ("part", "hash", "parent", "length", "count", "tokens")})


# ----------------------------------------------------------------------------- tokenizing

def classify_prompt(value: Any, chat: bool) -> tuple[str, Any]:
    """('text' | 'ids' | 'messages' | 'error', payload) for one cell of the prompt column.

    Token ids come back as a 1-d integer numpy array (checked in C, not per element).  Ids that do not fit
    in int32 (how they travel) are an error here; the engine checks the rest against the vocabulary.
    """
    if isinstance(value, str):
        if not value:
            return "error", "empty prompt"
        unicode_error = _not_unicode(value)
        if unicode_error:
            return "error", unicode_error
        return ("messages", [{"role": "user", "content": value}]) if chat else ("text", value)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "error", "prompt is null"
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        if len(value) == 0:
            return "error", "empty prompt"
        if isinstance(value[0], dict):
            if all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
                return "messages", [dict(m) for m in value]
        elif not chat:
            ids = value if isinstance(value, np.ndarray) else _int_array(value)
            if ids is not None and ids.ndim == 1 and ids.dtype.kind in "iu":
                return _checked_ids(ids)
    return "error", f"prompt must be text, token ids or chat messages, got {_describe(value)}"


_INT32 = np.iinfo(np.int32)


def _checked_ids(ids: np.ndarray) -> tuple[str, Any]:
    """('ids', ids), or an error for ids that int32 cannot hold (they would wrap into other, valid ids)."""
    if ids.dtype.itemsize > 4 or ids.dtype.kind == "u":
        bad = ids[(ids > _INT32.max) | (ids < _INT32.min)] if ids.dtype.kind == "i" else ids[ids > _INT32.max]
        if bad.size:
            return "error", f"token ids out of range (no vocabulary has ids of 2**31 or more): {bad[:5].tolist()}"
    return "ids", ids


def _not_unicode(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate, which no tokenizer can encode), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"prompt text is not valid Unicode: {exc}"
    return None


def _int_array(value: Any) -> np.ndarray | None:
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged or odd contents
        return None


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim != 1:
        return f"ndarray of shape {value.shape}"
    if isinstance(value, (list, tuple, np.ndarray)):
        inner = {type(v).__name__ for v in list(value)[:8]}
        return f"{type(value).__name__} of {', '.join(sorted(inner))}"
    return type(value).__name__


def arrow_token_rows(column: pd.Series) -> list[np.ndarray | None] | None:
    """Rows of an Arrow list-of-integers column as int32 arrays (None where null); None for other columns.

    The fast path for token-id columns (`dtype_backend="pyarrow"` parquet, for
    instance): no Python object per token.
    """
    dtype = column.dtype
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_list(dtype.pyarrow_dtype)
            and pa.types.is_integer(dtype.pyarrow_dtype.value_type)):
        return None
    arr = pa.array(column.array)
    arr = (arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr).cast(pa.list_(pa.int32()))
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def encode(tokenizer: Any, kinds: list[tuple[str, Any]]) -> list[Any]:
    """Token ids for every classified prompt (None where it is an error), texts in one batch call.

    Texts are encoded as `tokenizer(text)` does (special tokens added), chat
    messages with the tokenizer's chat template and the generation prompt.
    """
    out: list[Any] = [p if k == "ids" else None for k, p in kinds]
    texts = [(i, p) for i, (k, p) in enumerate(kinds) if k == "text"]
    if texts:
        ids = tokenizer([p for _, p in texts])["input_ids"]
        for (i, _), row in zip(texts, ids):
            out[i] = list(row)
    for i, (k, p) in enumerate(kinds):
        if k == "messages":
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            out[i] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return out


def encode_each(tokenizer: Any, kinds: list[tuple[str, Any]]) -> tuple[list[Any], list[tuple[str, Any]]]:
    """`encode` in one batch; where that fails, row by row, so that only the rows the tokenizer (or a chat
    template) fails on get the error, as (ids, kinds with those rows turned into errors)."""
    try:
        return encode(tokenizer, kinds), kinds
    except Exception:  # noqa: BLE001 - find the rows that fail
        pass
    ids, out = [], []
    for kind in kinds:
        try:
            ids.append(encode(tokenizer, [kind])[0])
            out.append(kind)
        except Exception as exc:  # noqa: BLE001 - a template or tokenizer failure becomes the row's error
            ids.append(None)
            out.append(("error", f"tokenizer failed on this prompt: {type(exc).__name__}: {exc}"))
    return ids, out


def _encode_with(model: str, kinds: list[tuple[str, Any]]) -> tuple[list[Any], list[tuple[str, Any]]]:
    """`encode_each` with this process's tokenizer of `model`; without one (a weights-only folder) every
    text and chat row gets the error."""
    from .caches import get_tokenizer
    try:
        tokenizer, lock = get_tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - the text rows' error; token-id rows still run
        return ([p if k == "ids" else None for k, p in kinds],
                [("error", f"tokenizer failed: {exc}") if k in ("text", "messages") else (k, p) for k, p in kinds])
    with lock:
        return encode_each(tokenizer, kinds)


def tokenize_rows(part: pd.DataFrame, prompt_col: str, model: str, chat: bool) -> tuple[list[Any], list[str | None]]:
    """(token ids, error) of every row of `part`: ids None where the row has an error message."""
    rows = None if chat else arrow_token_rows(part[prompt_col])
    if rows is not None:
        kinds = [("error", "prompt is null") if r is None else ("error", "empty prompt") if not len(r) else ("ids", r)
                 for r in rows]
    else:
        kinds = [classify_prompt(v, chat) for v in part[prompt_col].tolist()]
    ids: list[Any] = [p if k == "ids" else None for k, p in kinds]
    if any(k in ("text", "messages") for k, _ in kinds):  # token-id rows need no tokenizer
        ids, kinds = _encode_with(model, kinds)
    errors = [p if k == "error" else None for k, p in kinds]
    for i, row in enumerate(ids):
        if errors[i] is None and (row is None or len(row) == 0):
            errors[i], ids[i] = "empty prompt", None
        elif errors[i] is not None:
            ids[i] = None
    return ids, errors


def tokenize_partition(part: pd.DataFrame, prompt_col: str, model: str, chat: bool) -> pd.DataFrame:
    """`part` plus TOKENS (ids, null on error) and ERROR (message or None): the ids travel with their row."""
    ids, errors = tokenize_rows(part, prompt_col, model, chat)
    return part.assign(**{TOKENS: token_column(ids, part.index),
                          ERROR: pd.Series(errors, index=part.index, dtype=object)})


def token_column(ids: list[Any], index: pd.Index) -> pd.Series:
    """The TOKENS column of a partition from each row's ids (None for a bad row)."""
    data = [None if row is None else np.asarray(row, dtype="<i4").tobytes() for row in ids]
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.array(data, type=pa.binary())), index=index)


def token_arrays(tokens: pd.Series) -> list[np.ndarray | None]:
    """Each row's token ids as an int32 numpy array (None where null)."""
    return [None if b is None else np.frombuffer(b, dtype="<i4") for b in _arrow(tokens).to_pylist()]


def token_counts(tokens: pd.Series) -> pd.Series:
    """Each row's number of prompt tokens (0 where null)."""
    lengths = pa.compute.binary_length(_arrow(tokens)).to_numpy(zero_copy_only=False)
    return pd.Series(np.nan_to_num(lengths.astype(float)).astype("int64") // 4, index=tokens.index)


def _arrow(tokens: pd.Series) -> pa.Array:
    arr = pa.array(tokens.array, type=pa.binary())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def tokenized_meta(meta: pd.DataFrame) -> pd.DataFrame:
    return meta.assign(**{TOKENS: pd.Series([], dtype=TOKENS_DTYPE, index=meta.index),
                          ERROR: pd.Series([], dtype=object, index=meta.index)})


# ----------------------------------------------------------------------------- prefix hashes

def prefix_hashes(ids: Any, block: int) -> Iterator[tuple[int, int]]:
    """(length, hash) of the prefixes of `ids` at lengths block, 2*block, 4*block, ... <= len(ids).

    Hashes are 63-bit, never 0 (0 marks an unshared row), chained so that
    each costs only the new tokens.
    """
    tokens = np.asarray(ids, dtype=np.int32)
    digest = hashlib.blake2b(digest_size=8)
    done, length = 0, block
    while length <= len(tokens):
        digest.update(tokens[done:length].tobytes())
        done = length
        yield length, (int.from_bytes(digest.copy().digest(), "little") >> 1) or 1
        length *= 2


def partition_stats(part: pd.DataFrame, block: int, partition_info: dict | None = None) -> pd.DataFrame:
    """Counts of this partition's prefix hashes: part, hash, parent, length, count, tokens.

    `tokens` sums the prompt lengths of the rows having the prefix.  A row
    with hash 0 holds the partition's totals over all runnable rows.
    """
    number = partition_info["number"] if partition_info else 0
    nodes: dict[int, list[int]] = {}
    rows, total = 0, 0
    for ids in token_arrays(part[TOKENS]):
        if ids is None:
            continue
        rows, total, parent = rows + 1, total + len(ids), 0
        for length, h in prefix_hashes(ids, block):
            node = nodes.setdefault(h, [parent, length, 0, 0])
            node[2] += 1
            node[3] += len(ids)
            parent = h
    table = [(number, 0, 0, 0, rows, total)] + [(number, h, *v) for h, v in nodes.items()]
    return pd.DataFrame(table, columns=_STATS_META.columns).astype("int64")


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PrefixGroup:
    """Rows whose longest shared prefix is one node: where they go on the cost line."""

    start: float         # cost of every group before this one
    cost: float          # shared prefix once + each row's suffix and max_tokens
    prefix_len: int
    split: bool          # cut at the partition boundaries (larger than a partition, or unshared rows)
    offsets: dict[int, float] = field(default_factory=dict)  # input partition -> row cost before it


@dataclass(frozen=True)
class PrefixPlan:
    """Where every row runs.  Small: one entry per shared prefix, not per row."""

    npartitions: int
    block: int
    max_tokens: int
    partition_cost: float                 # the cost each output partition aims at
    shared: frozenset[int]                # every prefix hash that two or more rows have
    groups: dict[int, PrefixGroup]        # prefix key -> group; key 0 holds the unshared rows

    def target(self, start: float) -> int:
        return min(self.npartitions - 1, max(0, int(start // self.partition_cost)))

    def row_target(self, key: int, row_pos: float) -> int:
        """The output partition of a row of group `key` whose cost midpoint, inside the group, is row_pos."""
        g = self.groups[key]
        if g.split:
            return self.target(g.start + g.prefix_len + row_pos)
        return self.target(g.start + g.cost / 2)


def _own_counts(stats: pd.DataFrame, shared: pd.Index) -> pd.DataFrame:
    """Per (part, key): rows and tokens of rows whose *deepest* shared prefix is key."""
    s = stats[stats["hash"].isin(shared)].set_index(["part", "hash"])[["parent", "length", "count", "tokens"]]
    children = s.reset_index().groupby(["part", "parent"])[["count", "tokens"]].sum()
    children.index = children.index.set_names(["part", "hash"])
    own = s.copy()
    sub = children.reindex(own.index, fill_value=0)
    own["count"] -= sub["count"]
    own["tokens"] -= sub["tokens"]
    return own[own["count"] > 0]


def _unshared(stats: pd.DataFrame, own: pd.DataFrame) -> pd.DataFrame:
    """Per part: rows and tokens of rows with no shared prefix."""
    totals = stats[stats["hash"] == 0].set_index("part")[["count", "tokens"]]
    keyed = own.groupby(level="part")[["count", "tokens"]].sum().reindex(totals.index, fill_value=0)
    return totals - keyed


def _group_order(own: pd.DataFrame, parents: dict[int, int]) -> list[int]:
    """Keys ordered by their chain of ancestor hashes: groups under one shallow prefix sit together."""
    def chain(key: int) -> tuple[int, ...]:
        path = [key]
        while parents.get(path[-1], 0):
            path.append(parents[path[-1]])
        return tuple(reversed(path))
    return sorted(own.index.get_level_values("hash").unique().tolist(), key=chain)


DEFAULT_PARTITION_TOKENS = 4_000_000
"""Default bound on one partition's estimated cost (prompt tokens after sharing plus max_tokens per row).

One partition is one `Engine.generate` call: its rows are lost together when a
worker dies, held together in memory, and written together to a checkpoint.
Four million cost tokens is a few minutes of an 8B model on one H100/H200
(about a million decode tokens and the prompts' prefill), while the tail of a
call (the last requests decoding at a small batch) stays a small share of it.
"""


def partition_count(total_cost: float, npartitions: int, partition_tokens: int | None) -> int:
    """At least `npartitions` (one per GPU worker), and enough that none costs more than `partition_tokens`."""
    if partition_tokens is None:
        return npartitions
    return max(npartitions, math.ceil(total_cost / partition_tokens))


def build_plan(stats: pd.DataFrame, npartitions: int, max_tokens: int, block: int,
               partition_tokens: int | None = None) -> PrefixPlan:
    """Reduce every partition's prefix counts to the global `PrefixPlan`.

    npartitions: the fewest output partitions (one per GPU worker); with `partition_tokens` the plan has more
    where the job's estimated cost needs them (`partition_count`).
    """
    stats = stats.astype("int64")
    nodes = stats[stats["hash"] != 0]
    glob = nodes.groupby("hash").agg(count=("count", "sum"), parent=("parent", "first"))
    shared = glob.index[glob["count"] >= 2]
    own = _own_counts(nodes, shared)
    own["cost"] = own["tokens"] - own["count"] * own["length"] + own["count"] * max_tokens
    unshared = _unshared(stats, own)
    unshared_cost = unshared["tokens"] + unshared["count"] * max_tokens
    parents = glob["parent"].to_dict()
    lengths = own.reset_index().groupby("hash")["length"].first().to_dict()
    per_key = own.reset_index().groupby("hash")["cost"].sum().to_dict()
    order = _group_order(own, parents)
    total = sum(lengths[k] + per_key[k] for k in order) + float(unshared_cost.sum())
    npartitions = partition_count(total, npartitions, partition_tokens)
    partition_cost = max(total / npartitions, 1e-9)
    groups: dict[int, PrefixGroup] = {}
    start = 0.0
    for key in order:
        cost = lengths[key] + per_key[key]
        part_costs = own.xs(key, level="hash")["cost"].sort_index()
        offsets = (part_costs.cumsum() - part_costs).to_dict()
        groups[key] = PrefixGroup(start, cost, lengths[key], cost > partition_cost, offsets)
        start += cost
    uc = unshared_cost.sort_index()
    groups[0] = PrefixGroup(start, float(uc.sum()), 0, True, (uc.cumsum() - uc).to_dict())
    return PrefixPlan(npartitions, block, max_tokens, partition_cost, frozenset(shared.tolist()), groups)


def assign_partitions(part: pd.DataFrame, plan: PrefixPlan, partition_info: dict | None = None) -> pd.DataFrame:
    """`part` plus KEY, KEY_LEN and TARGET (the output partition), and its index stashed in columns."""
    number = partition_info["number"] if partition_info else 0
    keys, lens, targets = [], [], []
    seen: dict[int, float] = {}
    for ids in token_arrays(part[TOKENS]):
        if ids is None:  # a bad row costs nothing: leave it near where it came from
            keys.append(0), lens.append(0), targets.append(number % plan.npartitions)
            continue
        key, key_len = 0, 0
        for length, h in prefix_hashes(ids, plan.block):
            if h not in plan.shared:
                break
            key, key_len = h, length
        cost = len(ids) - key_len + plan.max_tokens
        before = seen.get(key, plan.groups[key].offsets.get(number, 0.0))
        seen[key] = before + cost
        keys.append(key), lens.append(key_len), targets.append(plan.row_target(key, before + cost / 2))
    out = stash_index(part)
    return out.assign(**{KEY: np.asarray(keys, dtype="int64"), KEY_LEN: np.asarray(lens, dtype="int64"),
                         TARGET: np.asarray(targets, dtype="int64")})


# ----------------------------------------------------------------------------- index

def stash_index(part: pd.DataFrame) -> pd.DataFrame:
    """The index levels copied into columns INDEX_PREFIX<i>, so that a shuffle can move them."""
    levels = {f"{INDEX_PREFIX}{i}": part.index.get_level_values(i) for i in range(part.index.nlevels)}
    return part.assign(**{k: v.to_numpy() if len(v) else v for k, v in levels.items()})


def restore_index(part: pd.DataFrame, names: list[Any]) -> pd.DataFrame:
    """Undo `stash_index`: the stashed columns become the index again, with its names."""
    cols = [f"{INDEX_PREFIX}{i}" for i in range(len(names))]
    out = part.set_index(cols)
    out.index = out.index.set_names(names)
    return out


def drop_internal(part: pd.DataFrame) -> pd.DataFrame:
    return part.drop(columns=[c for c in INTERNAL if c in part.columns])


def planned_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """Meta of `assign_partitions`' output."""
    out = stash_index(tokenized_meta(meta))
    return out.assign(**{c: pd.Series([], dtype="int64", index=meta.index) for c in (KEY, KEY_LEN, TARGET)})


# ----------------------------------------------------------------------------- the dask graph

def tokenize(ddf: Any, prompt_col: str, model: str, *, chat: bool) -> Any:
    """`ddf` plus TOKENS and ERROR, lazily (`tokenize_partition` on every partition)."""
    return ddf.map_partitions(tokenize_partition, prompt_col, model, chat, meta=tokenized_meta(ddf._meta))


def prefix_stats(tok: Any, block: int = 16) -> Any:
    """Every input partition's prefix counts (`partition_stats`), lazily: one small frame per partition."""
    return tok.map_partitions(partition_stats, block, meta=_STATS_META)


def compute_plan(tok: Any, *, max_tokens: int, npartitions: int, partition_tokens: int | None = None,
                 block: int = 16) -> PrefixPlan:
    """The `PrefixPlan` of the tokenized `tok`, computed now (on the current scheduler).

    Eager, as Dask's own `set_index` computes its divisions: the shuffle that
    follows needs the number of output partitions when its graph is built, and
    with `partition_tokens` that number depends on the job's cost.  Only the
    prefix counts come back to the client (one row per distinct prefix hash per
    input partition, not per row).
    """
    return build_plan(prefix_stats(tok, block).compute(), npartitions, max_tokens, block, partition_tokens)


def shuffle_to_plan(tok: Any, plan: PrefixPlan) -> Any:
    """Shuffle the tokenized `tok` lazily into `plan`'s partitions: the result's partitions are those the engine runs.

    Its index is TARGET (the partition number); the original index is in the
    INDEX_PREFIX columns.
    """
    meta = tok._meta.drop(columns=[TOKENS, ERROR])
    keyed = tok.map_partitions(assign_partitions, plan, meta=planned_meta(meta))
    return keyed.set_index(TARGET, divisions=list(range(plan.npartitions + 1)), shuffle_method=shuffle_method(meta))


def prefix_shuffle(tok: Any, *, max_tokens: int, npartitions: int, partition_tokens: int | None = None,
                   block: int = 16) -> Any:
    """`compute_plan` now, then `shuffle_to_plan` lazily."""
    plan = compute_plan(tok, max_tokens=max_tokens, npartitions=npartitions, partition_tokens=partition_tokens,
                        block=block)
    return shuffle_to_plan(tok, plan)


def shuffle_method(meta: pd.DataFrame) -> str | None:
    """Dask's configured shuffle, except "tasks" where a column may not survive a trip through Arrow.

    distributed's P2P shuffle sends partitions as Arrow tables: it cannot rebuild
    an Arrow list or struct column's pandas dtype, nor convert an object column
    of mixed values (the non-text prompts this layer accepts).  The task-based
    shuffle pickles pandas frames and takes anything.
    """
    def arrow_safe(dtype: Any) -> bool:
        if isinstance(dtype, pd.ArrowDtype):
            return not pa.types.is_nested(dtype.pyarrow_dtype)
        return dtype != object
    return None if all(arrow_safe(t) for t in meta.dtypes) else "tasks"

