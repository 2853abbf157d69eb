"""Registering many pairs on a Dask cluster (``pip install "dask[distributed]"``).

>>> from distributed import Client, LocalCluster
>>> from obelisk.dask import register_pairs
>>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
>>> results = register_pairs([("f1.nii.gz", "m1.nii.gz"), ("f2.nii.gz", "m2.nii.gz")],
...                          client, out="reg/", features="mind")

Each pair is one task: ``obelisk.register`` with the given options, its files saved to
``out/<name>/`` when ``out`` is given. Tasks return a :class:`PairResult` (metrics, and the
displacement only when asked for: it is the bulk of what comes back to the client). Paths are the
cheapest inputs to send: workers read the files themselves, so they must see the same file system
(as on a Slurm cluster with shared storage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["PairResult", "pairs_from_dataset", "register_pairs"]

# what a pair may hold besides the options shared by all pairs
_PAIR_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "truth", "name")


@dataclass
class PairResult:
    """The outcome of one pair: ``metrics`` (metrics.json's content), the folder its files were
    saved to, the displacement when ``with_displacement``, or ``error`` when it failed (with
    ``errors="return"``)."""

    name: str
    metrics: Optional[dict] = None
    out_dir: Optional[str] = None
    displacement: Optional[np.ndarray] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


PairLike = Union[Mapping[str, Any], Sequence[Any]]


def _normalise(pairs: Iterable[PairLike]) -> List[dict]:
    out: List[dict] = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            d = dict(p)
            unknown = set(d) - set(_PAIR_KEYS)
            if unknown:
                raise ValueError(f"pair {i}: unknown keys {sorted(unknown)}; a pair holds {', '.join(_PAIR_KEYS)}")
        else:
            if len(p) != 2:
                raise ValueError(f"pair {i}: expected (fixed, moving) or a dict, got {len(p)} items")
            d = {"fixed": p[0], "moving": p[1]}
        if "fixed" not in d or "moving" not in d:
            raise ValueError(f"pair {i}: needs fixed and moving")
        d.setdefault("name", f"pair_{i:04d}")
        out.append(d)
    names = [d["name"] for d in out]
    if len(set(names)) != len(names):
        raise ValueError("pair names must be unique (they name the output folders)")
    return out


def _register_one(
    pair: dict, options: dict, out: Optional[str], force: bool, with_displacement: bool, errors: str
) -> PairResult:
    """One task: register, save, and return what the client needs (runs on a worker)."""
    import obelisk

    pair = dict(pair)
    name = pair.pop("name")
    try:
        r = obelisk.register(pair.pop("fixed"), pair.pop("moving"), **pair, **options)
        metrics = r.metrics
        out_dir = None
        if out is not None:
            out_dir = os.path.join(out, name)
            metrics = r.save(out_dir, force=force)
        return PairResult(name, metrics, out_dir, r.displacement if with_displacement else None)
    except Exception as e:  # noqa: BLE001 - reported per pair with errors="return"
        if errors == "raise":
            raise
        return PairResult(name, error=f"{type(e).__name__}: {e}")


def register_pairs(
    pairs: Iterable[PairLike],
    client: Any = None,
    *,
    out: Union[None, str, "os.PathLike[str]"] = None,
    force: bool = False,
    with_displacement: bool = False,
    errors: str = "raise",
    threads: Optional[int] = 1,
    **options: Any,
) -> List[PairResult]:
    """Registers every pair on the workers of a ``distributed.Client``; results in input order.

    ``pairs``: ``(fixed, moving)`` tuples or dicts with ``fixed``, ``moving`` and optionally
    ``fixed_labels``, ``moving_labels``, ``fixed_mask``, ``moving_mask``, ``truth`` and
    ``name`` (the output folder's name; default ``pair_0000``, ...). ``client``: default, the
    current client (``distributed.get_client()``). ``out``: save each pair's files (those of
    ``obelisk register``) to ``out/<name>/``. ``errors``: ``"raise"`` (the first failure
    raises) or ``"return"`` (a failed pair's :class:`PairResult` holds the error and the others
    go on). ``threads``: threads per registration; the default, 1, suits workers with one thread
    each (``LocalCluster(n_workers=cores, threads_per_worker=1)``): as many registrations run at
    once as the cluster has worker threads. The other keyword arguments are
    :func:`obelisk.register`'s options.
    """
    if errors not in ("raise", "return"):
        raise ValueError(f'errors must be "raise" or "return", got {errors!r}')
    todo = _normalise(pairs)
    if client is None:
        from distributed import get_client

        try:
            client = get_client()
        except ValueError as e:
            raise ValueError("no Dask client: pass client= or create a distributed.Client first") from e
    opts = dict(options, threads=threads)
    out_s = None if out is None else os.fspath(out)
    futures = client.map(
        _register_one,
        todo,
        options=opts,
        out=out_s,
        force=force,
        with_displacement=with_displacement,
        errors=errors,
        key=[f"obelisk-register-{d['name']}" for d in todo],
        pure=False,
    )
    return client.gather(futures)


def pairs_from_dataset(path: Union[str, "os.PathLike[str]"]) -> List[dict]:
    """The registration pairs of a dataset.json (``obelisk synth``'s, or the corpus'): its
    ``registration_val`` entries with their label maps, paths relative to the file, named by
    their ``name`` or else ``<fixed stem>__<moving stem>``."""
    import json

    root = os.path.dirname(os.path.abspath(os.fspath(path)))
    with open(os.fspath(path), encoding="utf-8") as f:
        ds = json.load(f)

    def full(rel: str) -> str:
        return os.path.normpath(os.path.join(root, rel))

    def stem(rel: str) -> str:
        return os.path.basename(rel).split(".")[0]

    pairs = []
    for p in ds.get("registration_val", []):
        d = {"fixed": full(p["fixed"]), "moving": full(p["moving"])}
        for key, field in (("fixed_labels", "fixed_label"), ("moving_labels", "moving_label")):
            if p.get(field):
                d[key] = full(p[field])
        d["name"] = p.get("name") or f"{stem(p['fixed'])}__{stem(p['moving'])}"
        pairs.append(d)
    return pairs
