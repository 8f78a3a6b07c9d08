"""The query path's model on ONNX Runtime: the same graph as torch's, about twice as fast on
a short text on one thread (torch spends most of a query's time in per-operator overhead).

The graph is exported once from the sentence-transformers model (tokens in, L2-normalised
sentence embedding out: transformer, pooling, the model's own Normalize, then normalisation
as `embedder.forward` does it) and kept in a cache folder, one file per key: the model folder's
files (path, size, modification time) and the versions of what produced the graph. Nothing is
trusted blindly: at every load the session's vectors are compared with torch's on fixed
probes (single texts and one padded group); past `TOLERANCE` the ONNX path is refused.

Export runs in a child process (`python -m retrieval.onnx_query export`): it takes seconds of
CPU and the tracer holds the GIL, which would stall the service's event loop if run in a
thread. The child takes a lock on the key, so replicas starting together export once.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Bump when the exported graph changes (its inputs, outputs, what the wrapper computes).
GRAPH_FORMAT = 1
OPSET = 18
OUTPUT = "sentence_embedding"
# Largest difference of a vector component allowed between ONNX Runtime and torch on the
# probes (measured on all-MiniLM-L6-v2: about 2e-7). Past it the ONNX path is refused.
TOLERANCE = 1e-5
# Token inputs the graph may take, in this order (BERT-like models; others keep torch).
FEATURES = ("input_ids", "attention_mask", "token_type_ids")

PROBES = (
    "What is the role of p53 in apoptosis?",
    "x",
    "  leading and trailing spaces  ",
    "Ünïcödé, emoji 🧬 and CJK 蛋白质",
    "0-dimensional biomaterials show inductive properties.",
    "word " * 400,  # past max_seq_length: truncated
)


class OnnxRefusedError(RuntimeError):
    """The ONNX graph is missing, unreadable or does not give torch's vectors."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ragmesh" / "onnx"


def _versions() -> dict[str, str]:
    """Versions of what produces the graph (a change re-exports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "sentence-transformers", "onnx", "onnxscript"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "-"
    return out


def cache_key(model_dir: str) -> str:
    """Digest of the model folder's files (relative path, size, mtime), the versions and the format."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256(f"{GRAPH_FORMAT}:{OPSET}:{root}".encode())
    for name, value in sorted(_versions().items()):
        digest.update(f"\0{name}={value}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def graph_path(model_dir: str, cache_dir: str | Path) -> Path:
    """Where the graph of this model (and these versions) lives in the cache."""
    return Path(cache_dir) / f"{Path(model_dir).name}-{cache_key(model_dir)}.onnx"


class OnnxQueryEncoder:
    """L2-normalised float32 embeddings of a few texts through an ONNX Runtime session on one thread.

    Tokenizes with the model's own tokenizer and the arguments sentence-transformers uses
    (pad to the longest, truncate to max_seq_length), so the graph sees torch's tokens.
    """

    def __init__(self, path: Path, tokenizer: Any, max_length: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread per process (the machine's cores are shared with the rest of the mesh);
        # no spinning worker threads either.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # any unreadable graph is refused the same way
            raise OnnxRefusedError(f"cannot load {path}: {exc}") from exc
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._tokenizer = tokenizer
        self._max_length = max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(
            texts, padding=True, truncation="longest_first", max_length=self._max_length, return_tensors="np"
        )
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self._inputs}
        (vectors,) = self._session.run([OUTPUT], feed)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def verify(encoder: Callable[[list[str]], np.ndarray], reference: Callable[[list[str]], np.ndarray]) -> float:
    """Largest component difference between the encoder's and torch's vectors on the probes
    (each alone, then all in one padded group); raises OnnxRefusedError past TOLERANCE."""
    worst = 0.0
    for group in [*([p] for p in PROBES), list(PROBES)]:
        ours, theirs = encoder(group), reference(group)
        if ours.shape != theirs.shape or not np.all(np.isfinite(ours)):
            raise OnnxRefusedError(f"ONNX vectors of shape {ours.shape}, torch's {theirs.shape}")
        worst = max(worst, float(np.abs(ours - theirs).max()))
    if worst > TOLERANCE:
        raise OnnxRefusedError(f"ONNX vectors differ from torch's by {worst:.2e} (more than {TOLERANCE:g})")
    return worst


# --- export (in a child process) -------------------------------------------------------


def export(model_dir: str, target: Path) -> None:
    """Export the model's query graph to `target` (atomically; under a lock per target, so that
    processes exporting the same key wait for the first instead of repeating it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return  # another process made it meanwhile
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            _export_graph(model_dir, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _export_graph(model_dir: str, path: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    # Eager attention: the same arithmetic as torch's SDPA kernel on CPU (the check at load says
    # so), a simpler graph for the tracer (seconds instead of ten) and for ONNX Runtime.
    model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"attn_implementation": "eager"}).eval()
    sample = model.tokenizer(["a probe", "a longer probe text, padded"], padding=True, return_tensors="pt")
    names = tuple(name for name in FEATURES if name in sample)
    if names[:2] != FEATURES[:2]:
        raise OnnxRefusedError(f"the tokenizer gives {sorted(sample)}; the ONNX path takes {FEATURES}")

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            embeddings = self.model(dict(zip(names, tensors, strict=True)))[OUTPUT]
            return torch.nn.functional.normalize(embeddings, p=2, dim=1)

    axes = {0: "batch", 1: "sequence"}
    # torch's TorchScript exporter (onnx is its only extra package): its trace of the shape
    # checks is what `verify` then tests on short, long and padded inputs.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Graph(),
            tuple(sample[name] for name in names),
            str(path),
            input_names=list(names),
            output_names=[OUTPUT],
            dynamic_axes={**{name: axes for name in names}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


class QueryGraph:
    """Brings the ONNX encoder up beside torch, in a background thread: the cached graph, or an
    export in a child process; then the check against torch. `on_ready` gets the encoder; on
    any failure torch goes on serving and a warning says why. A cached graph that does not
    load or verify (corrupt, stale) is deleted and exported again, once.

    `reference` computes torch's vectors (blocking; the caller runs it where the model may be
    used). `exporter` makes the graph file (default: a child process at `nice`)."""

    def __init__(
        self,
        model_dir: str,
        cache_dir: str | Path,
        make_encoder: Callable[[Path], Callable[[list[str]], np.ndarray]],
        reference: Callable[[list[str]], np.ndarray],
        on_ready: Callable[[Callable[[list[str]], np.ndarray], float], None],
        nice: int = 0,
        exporter: Callable[[str, Path], None] | None = None,
    ) -> None:
        self._model_dir = model_dir
        self._cache_dir = Path(cache_dir)
        self._make_encoder = make_encoder
        self._reference = reference
        self._on_ready = on_ready
        self._nice = nice
        self._exporter = exporter or self._export_in_child
        self._child: subprocess.Popen[str] | None = None
        self._stopped = False
        self.done = threading.Event()  # set once the ONNX path is up or refused
        self.error = ""  # why it was refused

    def start(self) -> None:
        threading.Thread(target=self.run, name="onnx-query-graph", daemon=True).start()

    def stop(self) -> None:
        """Stop an export under way (the cache keeps no partial file)."""
        self._stopped = True
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, torch keeps serving
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("ONNX query path refused, torch serves queries", extra={"error": self.error})
        finally:
            self.done.set()

    def _run(self) -> None:
        target = graph_path(self._model_dir, self._cache_dir)
        for attempt in (1, 2):
            exported = False
            if not target.is_file():
                self._exporter(self._model_dir, target)
                exported = True
            try:
                encoder = self._make_encoder(target)
                worst = verify(encoder, self._reference)
            except OnnxRefusedError as exc:
                if exported or attempt == 2 or self._stopped:
                    raise
                # A cached file that does not load or verify: corrupt, or stale in a way the key
                # missed. Made again from the model.
                log.warning("cached ONNX query graph refused, exporting it again", extra={"error": str(exc)})
                target.unlink(missing_ok=True)
                continue
            self._on_ready(encoder, worst)
            log.info("queries embed with ONNX Runtime", extra={"path": str(target), "largest_difference": worst})
            return

    def _export_in_child(self, model_dir: str, target: Path) -> None:
        """Export in a child process: the tracer holds the GIL for seconds, which would stall the
        service's event loop in a thread. It runs at `nice`, on one thread."""
        command = [sys.executable, "-m", "retrieval.onnx_query", "export", "--model", model_dir, "--out", str(target)]
        command += ["--nice", str(self._nice)]
        started = time.perf_counter()
        if self._stopped:
            raise OnnxRefusedError("stopped")
        self._child = subprocess.Popen(
            command,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stderr = self._child.communicate()
        if self._child.returncode != 0 or not target.is_file():
            raise OnnxRefusedError(f"export failed ({self._child.returncode}): {stderr.strip()[-2000:]}")
        log.info(
            "ONNX query graph exported", extra={"path": str(target), "seconds": round(time.perf_counter() - started, 1)}
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Export the retrieval query model's ONNX graph into its cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("export", help="one model to one file")
    one.add_argument("--model", required=True)
    one.add_argument("--out", required=True, type=Path)
    one.add_argument("--nice", type=int, default=0, help="run at this lower priority (the service's bulk_nice)")
    sub.add_parser("prepare", help="the configured model into the configured cache (make install)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "export":
        if args.nice:
            os.nice(args.nice)  # the export must not slow down queries or generation
        export(args.model, args.out)
        return
    from retrieval.embedder import model_path
    from retrieval.settings import RetrievalSettings

    settings = RetrievalSettings()
    model = model_path(settings)
    target = graph_path(model, settings.onnx_cache_dir or default_cache_dir())
    started = time.perf_counter()
    export(model, target)
    print(f"ONNX query graph: {target} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
