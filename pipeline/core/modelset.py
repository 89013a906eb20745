"""ModelSet: the named ONNX graphs that flow between steps, plus how they chain.

On disk a ModelSet is a folder: one `.onnx` file per graph, the sidecar files
a runtime needs (a Piper voice's `.onnx.json`), and `modelset.json`:

    {"graphs": [{"name": "model", "file": "en_US-joe-medium.onnx", "sha256": "..."}],
     "sidecars": {"en_US-joe-medium.onnx.json": "model"},
     "chain": []}

`chain` lists the edges between graphs (`{"from": "encoder.z", "to": "decoder.z"}`);
it is empty for a single-graph ModelSet.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from pipeline.core.errors import PipelineError, few
from pipeline.core.onnx_io import external_files, is_large, load_onnx, parse_graph, save_onnx, save_sharing_weights

MANIFEST = "modelset.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_sha256(path: Path) -> str:
    """A graph file's hash, over its external-data files too (a graph may keep its weights in one that
    other graphs share)."""
    try:
        extra = external_files(path) if path.suffix == ".onnx" else []
    except Exception:  # a corrupt file: its bytes' hash differs from the recorded one, which is what matters
        extra = []
    if not extra:
        return file_sha256(path)
    h = hashlib.sha256(file_sha256(path).encode())
    for f in extra:
        h.update(f.name.encode() + file_sha256(f).encode())
    return h.hexdigest()


def _digests(model: onnx.ModelProto, min_bytes: int) -> set[bytes]:
    """Content hashes of a model's weights of at least `min_bytes` that it holds in the proto."""
    return {hashlib.sha256(t.raw_data).digest() for t in model.graph.initializer if len(t.raw_data) >= min_bytes}


@dataclass
class GraphFile:
    name: str
    file: str
    sha256: str = ""


@dataclass
class ModelSet:
    """A folder of graphs. Protos are loaded lazily: a cached step never parses them."""

    root: Path
    graphs: list[GraphFile]
    sidecars: dict[str, str] = field(default_factory=dict)  # sidecar file -> graph it belongs to
    chain: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # what an exporter says about the set (config, seeded)

    def names(self) -> list[str]:
        return [g.name for g in self.graphs]

    def graph(self, name: str) -> GraphFile:
        for g in self.graphs:
            if g.name == name:
                return g
        raise PipelineError(f"no graph named {name!r} in the model set (graphs: {', '.join(self.names())})")

    def path(self, name: str) -> Path:
        return self.root / self.graph(name).file

    def load(self, name: str) -> onnx.ModelProto:
        return load_onnx(self.path(name))

    def content_hash(self) -> str:
        """Hash over every graph's bytes and the chain: the cache key of what a step reads."""
        h = hashlib.sha256()
        for g in self.graphs:
            h.update(g.name.encode())
            h.update((g.sha256 or graph_sha256(self.root / g.file)).encode())
        h.update(json.dumps(self.chain, sort_keys=True).encode())
        return h.hexdigest()

    def files(self) -> list[Path]:
        """Every graph file and external-data file, each once."""
        found = {}
        for g in self.graphs:
            for f in [self.root / g.file, *external_files(self.root / g.file)]:
                found[f] = True
        return list(found)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def to_json(self) -> dict[str, Any]:
        return {"graphs": [vars(g) for g in self.graphs], "sidecars": self.sidecars, "chain": self.chain,
                "meta": self.meta}

    def write_manifest(self) -> None:
        (self.root / MANIFEST).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, root: Path) -> ModelSet:
        path = root / MANIFEST
        try:
            data = json.loads(path.read_text())
            graphs = [GraphFile(**g) for g in data["graphs"]]
        except FileNotFoundError:
            raise PipelineError(f"{root}: not a model set folder (no {MANIFEST})") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: unreadable model set manifest: {e}") from None
        ms = cls(root, graphs, data.get("sidecars", {}), data.get("chain", []), data.get("meta", {}))
        for g in graphs:
            if not (root / g.file).is_file():
                raise PipelineError(f"{path}: lists {g.file} for graph {g.name!r}, but the file is missing")
        return ms

    def require_unchanged(self) -> None:
        """A runtime's guard: every graph file still has the hash modelset.json recorded for it."""
        changed = [g.file for g in self.graphs if g.sha256 and graph_sha256(self.root / g.file) != g.sha256]
        if changed:
            raise PipelineError(f"{self.root}: modelset.json does not match its files (changed since it was "
                                f"written: {few(changed, 5)})")

    def verify(self) -> bool:
        """True when every graph file still has the hash the manifest recorded."""
        try:
            return all(graph_sha256(self.root / g.file) == g.sha256 for g in self.graphs)
        except OSError:
            return False

    def derive(self, root: Path) -> ModelSet:
        """An empty twin in another folder (same graph names and files), for a step's output."""
        return ModelSet(root, [GraphFile(g.name, g.file) for g in self.graphs], dict(self.sidecars), list(self.chain),
                        dict(self.meta))

    def save_graph(self, name: str, model: onnx.ModelProto, weights_dir: Path | None = None) -> None:
        """Write a graph; a light proto's weights are read from its external-data files in `weights_dir`."""
        g = self.graph(name)
        save_onnx(model, self.root / g.file, weights_dir)
        g.sha256 = graph_sha256(self.root / g.file)

    def share_weights(self, data_file: str = "weights.bin", min_bytes: int = 1 << 20) -> list[str]:
        """Graphs holding byte-identical weights (a prefill and a decode graph a pass left alike) rewritten with
        one shared external-data file, so the set costs one copy on disk; the graphs' names, or [] when none
        share a tensor of `min_bytes`. Graphs already reading `data_file` are rewritten with them."""
        digests: dict[str, set[bytes]] = {}
        inline: set[bytes] = set()  # weights some graph still holds itself
        reads_data: set[str] = set()  # graphs already reading `data_file`
        for g in self.graphs:
            path = self.root / g.file
            if is_large(path):  # its weights would not fit a proto: left out of sharing
                continue
            model = parse_graph(path)
            inline |= _digests(model, min_bytes)
            external = external_files(path, model)
            if external:
                onnx.load_external_data_for_model(model, str(self.root))
                if self.root / data_file in external:
                    reads_data.add(g.name)
            digests[g.name] = _digests(model, min_bytes)
        counts: dict[bytes, int] = {}
        for found in digests.values():
            for d in found:
                counts[d] = counts.get(d, 0) + 1
        if not any(counts[d] > 1 for d in inline):  # nothing held twice that is not shared already
            return []
        sharing = [n for n, found in digests.items() if any(counts[d] > 1 for d in found) or n in reads_data]
        save_sharing_weights({self.path(n): load_onnx(self.path(n)) for n in sharing}, self.root / data_file)
        for n in sharing:
            self.graph(n).sha256 = graph_sha256(self.path(n))
        return sharing

    def replace_graph(self, name: str, new_names: list[str], chain: list[dict[str, Any]]) -> None:
        """Make room for the graphs one graph was cut into (files `<stem>.<new>.onnx`, in its place).

        Its sidecars go with the first new graph (a Piper voice's config belongs to the encoder)."""
        at = self.names().index(name)
        stem = Path(self.graphs[at].file).stem
        taken = set(self.names()) - {name}
        clash = [n for n in new_names if n in taken]
        if clash:
            raise PipelineError(f"cutting graph {name!r} would make graphs named {clash}, which exist already")
        self.graphs[at:at + 1] = [GraphFile(n, f"{stem}.{n}.onnx") for n in new_names]
        self.sidecars = {f: (new_names[0] if g == name else g) for f, g in self.sidecars.items()}
        self.chain = self.chain + list(chain)

    def copy_graph_from(self, other: ModelSet, name: str) -> None:
        """The graph's file, and its external-data files unless an earlier copy brought them."""
        g = self.graph(name)
        for f in external_files(other.path(name)):
            if not (self.root / f.name).exists():
                shutil.copyfile(f, self.root / f.name)
        shutil.copyfile(other.path(name), self.root / g.file)
        g.sha256 = other.graph(name).sha256 or graph_sha256(self.root / g.file)

    def copy_sidecars_from(self, other: ModelSet) -> None:
        for sidecar in self.sidecars:
            shutil.copyfile(other.root / sidecar, self.root / sidecar)
