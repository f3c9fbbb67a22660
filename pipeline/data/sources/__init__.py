"""What `mocoplus ingest` reads: an image folder, a list of paths, or Fashion-MNIST.

A source is resolved up front into an ordered list of `SourceItem` (key,
label, where the bytes are) plus the inputs already known to be unusable (a
listed file that does not exist, a file outside any class folder). The order
is sorted and the keys derive from paths, so the same input always gives the
same items, keys and shards.

Each kind of source is one module behind the same small interface, `claims(spec)`
and `resolve(spec) -> Source` (the items, listed, each with the `ItemInput` an
ingest worker opens: a local file's bytes, an array row's pixels, or whatever
a new kind brings), tried in `SOURCE_KINDS` order: a new kind of source is its
module and its entry there. The fingerprint (paths, sizes, modification
times; the IDX files for Fashion-MNIST) is what a rerun compares to decide
whether earlier output is still the output of this input.

Keys become tar member names, and WebDataset splits a member name at the first
dot of its base name, so keys keep only ``[A-Za-z0-9_/-]`` (everything else
becomes ``_``) and are made unique by a ``_2``, ``_3``... suffix in input order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.data.sources import fashion_mnist, folder, listfile
from pipeline.data.sources.base import Source


@dataclass(frozen=True)
class SourceKind:
    """One kind of image source: which specs it claims and how it lists their items."""

    name: str
    claims: Callable[[str], bool]
    resolve: Callable[[str], Source]


SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind(fashion_mnist.FASHION_MNIST, fashion_mnist.claims, fashion_mnist.fashion_mnist_source),
    SourceKind("folder", folder.claims, folder.folder_source),
    SourceKind("list", listfile.claims, listfile.list_source),
)


def resolve_source(spec: str) -> Source:
    """``fashion-mnist[:train|:test]``, a folder of images, or a ``.txt``/``.csv`` list of paths."""
    for kind in SOURCE_KINDS:
        if kind.claims(spec):
            return kind.resolve(spec)
    raise FileNotFoundError(
        f"source {spec!r} is neither a folder, a list file nor fashion-mnist[:train|:test] (no such file or folder)"
    )
