"""`ragmesh` command line: talks to a running mesh through its public HTTP API.

    ragmesh ingest corpus.jsonl --collection scifact --create
    ragmesh ingest ./notes --collection notes --create      # *.txt, *.md and *.jsonl under a folder
    ragmesh search "what causes tides" --collection notes
    ragmesh batch submit lines.jsonl --wait            # OpenAI batch: results saved beside the file
    ragmesh keys create alice --rpm 60 --tpm 100000 --models SmolLM2-135M-Instruct --expires-in 30d
    ragmesh keys list
    ragmesh keys revoke key_0123456789abcdef

With auth on, requests carry $RAGMESH_API_KEY (or --api-key); `keys` commands
carry the admin key, $RAGMESH_ADMIN_KEY (or --admin-key).

JSONL lines are {"id" or "_id", "text", "title"?, "metadata"?}. A text file
becomes one document: its path (relative to the folder) is the id, its name
the title.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_URL = os.environ.get("RAGMESH_URL", "http://127.0.0.1:8080")
# The gateway's internal admin server: the admin API is not on the public port.
DEFAULT_ADMIN_URL = os.environ.get("RAGMESH_ADMIN_URL", "http://127.0.0.1:8081")


def _client(args: argparse.Namespace, key: str | None = None, url: str | None = None) -> httpx.Client:
    key = key if key is not None else args.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url or args.url, timeout=args.timeout, headers=headers)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            raw = json.loads(line)
            doc_id = raw.get("id", raw.get("_id"))
            if doc_id is None or "text" not in raw:
                raise SystemExit(f"{path}:{number}: a document needs 'id' (or '_id') and 'text'")
            doc: dict[str, Any] = {"id": str(doc_id), "text": raw["text"], "title": raw.get("title") or ""}
            if raw.get("metadata"):
                doc["metadata"] = raw["metadata"]
            yield doc


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Documents from a JSONL file or from the text files under a folder."""
    if path.is_file():
        yield from read_jsonl(path)
        return
    for file in sorted(path.rglob("*")):
        if file.suffix == ".jsonl":
            yield from read_jsonl(file)
        elif file.suffix in (".txt", ".md") and file.is_file():
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield {"id": str(file.relative_to(path)), "title": file.stem, "text": text}


def batches(docs: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check(reply: httpx.Response) -> dict[str, Any]:
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        raise SystemExit(f"error {reply.status_code}: {message}")
    body: dict[str, Any] = reply.json()
    return body


def ingest(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    with _client(args) as client:
        if args.create:
            reply = client.post("/v1/collections", json={"name": args.collection})
            if reply.status_code != 409:
                _check(reply)
        jobs: list[dict[str, Any]] = []
        documents = 0
        with tqdm(desc="submitting", unit="doc") as bar:
            for batch in batches(read_documents(path), args.batch_size):
                accepted = _check(
                    client.post(f"/v1/collections/{args.collection}/documents", json={"documents": batch})
                )
                jobs.append(accepted)
                documents += len(batch)
                bar.update(len(batch))
        total = sum(int(job["chunks"]) for job in jobs)
        print(f"{documents} documents, {total} chunks queued in {len(jobs)} job(s)", file=sys.stderr)
        if args.no_wait:
            for job in jobs:
                print(job["job_id"])
            return 0
        return _wait(client, jobs, total)


def _wait(client: httpx.Client, jobs: list[dict[str, Any]], total: int) -> int:
    pending = {job["job_id"] for job in jobs}
    done_by_job: dict[str, int] = {}
    failed: list[dict[str, Any]] = []
    with tqdm(total=total, desc="indexing", unit="chunk") as bar:
        while pending:
            for job_id in sorted(pending):
                status = _check(client.get(f"/v1/jobs/{job_id}"))
                done_by_job[job_id] = int(status["done"])
                if status["status"] in ("succeeded", "failed"):
                    pending.discard(job_id)
                    if status["status"] == "failed":
                        failed.append(status)
            bar.n = sum(done_by_job.values())
            bar.refresh()
            if pending:
                time.sleep(0.5)
    for status in failed:
        print(f"job {status['id']} failed: {status['error']}", file=sys.stderr)
    return 1 if failed else 0


def batch_submit(args: argparse.Namespace) -> int:
    """Upload a batch file, create the batch, and (with --wait) follow it to the end and save the results."""
    path = Path(args.path)
    with _client(args) as client:
        with open(path, "rb") as handle:
            uploaded = _check(client.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": "batch"}))
        endpoint = args.endpoint or _first_url(path)
        batch = _check(
            client.post(
                "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
            )
        )
        print(batch["id"])
        if not args.wait:
            return 0
        total = int(batch["request_counts"]["total"])
        with tqdm(total=total, desc=batch["id"][:18], unit="line") as bar:
            while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.5)
                batch = _check(client.get(f"/v1/batches/{batch['id']}"))
                counts = batch["request_counts"]
                bar.n = int(counts["completed"]) + int(counts["failed"])
                bar.refresh()
        counts = batch["request_counts"]
        print(f"{batch['status']}: {counts['completed']} completed, {counts['failed']} failed", file=sys.stderr)
        for kind in ("output_file_id", "error_file_id"):
            if batch.get(kind):
                target = path.with_suffix(f".{kind.split('_')[0]}.jsonl")
                target.write_bytes(client.get(f"/v1/files/{batch[kind]}/content").content)
                print(f"{kind.split('_')[0]}: {target}", file=sys.stderr)
        return 0 if batch["status"] == "completed" else 1


def _first_url(path: Path) -> str:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                return str(json.loads(line).get("url", "/v1/chat/completions"))
    raise SystemExit(f"{path} is empty")


def search(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = {"collection": args.collection, "query": args.query, "top_k": args.top_k, "mode": args.mode}
        for hit in _check(client.post("/v1/search", json=body))["results"]:
            print(f"{hit['score']:.4f}  {hit['document_id']}  {hit['title'][:60]}")
    return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds of "90", "90s", "15m", "12h" or "30d"."""
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (like 3600, 15m, 12h, 30d)")
    return int(number) * _DURATION_UNITS[unit]


def keys_create(args: argparse.Namespace) -> int:
    """Create a key; the secret is printed once (stdout), the key's card on stderr."""
    body = {
        "name": args.name,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "models": args.models or [],
        "expires_in": args.expires_in,
    }
    with _client(args, args.admin_key, args.admin_url) as client:
        created = _check(client.post("/v1/admin/keys", json=body))
    print(created.pop("key"))
    print(json.dumps(created, indent=2), file=sys.stderr)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    with _client(args, args.admin_key, args.admin_url) as client:
        listed = _check(client.get("/v1/admin/keys"))["data"]
    print(f"{'id':22} {'name':20} {'rpm':>6} {'tpm':>9} {'expires':>20}  {'state':8} models")
    for key in listed:
        expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key["expires_at"])) if key["expires_at"] else "-"
        expired = key["expires_at"] is not None and key["expires_at"] <= time.time()
        state = "revoked" if key["revoked"] else "expired" if expired else "active"
        print(
            f"{key['id']:22} {key['name'][:20]:20} {key['rpm'] or '-':>6} {key['tpm'] or '-':>9} {expires:>20}  "
            f"{state:8} {','.join(key['models'] or ['*'])}"
        )
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    with _client(args, args.admin_key, args.admin_url) as client:
        revoked = _check(client.delete(f"/v1/admin/keys/{args.key_id}"))
    print(f"revoked {revoked['id']} ({revoked['name']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ragmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="the gateway (default: %(default)s, or $RAGMESH_URL)")
    parser.add_argument(
        "--admin-url",
        default=DEFAULT_ADMIN_URL,
        help="the admin server, for `keys` (default: %(default)s, or $RAGMESH_ADMIN_URL)",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--api-key", default=os.environ.get("RAGMESH_API_KEY", ""), help="default: $RAGMESH_API_KEY")
    parser.add_argument(
        "--admin-key", default=os.environ.get("RAGMESH_ADMIN_KEY", ""), help="for `keys`; default: $RAGMESH_ADMIN_KEY"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p_ingest = commands.add_parser("ingest", help="ingest a JSONL file or a folder of text files")
    p_ingest.add_argument("path")
    p_ingest.add_argument("--collection", required=True)
    p_ingest.add_argument("--create", action="store_true", help="create the collection if it does not exist")
    p_ingest.add_argument("--batch-size", type=int, default=500, help="documents per request (default: %(default)s)")
    p_ingest.add_argument("--no-wait", action="store_true", help="print the job ids instead of waiting")
    p_ingest.set_defaults(run=ingest)

    p_batch = commands.add_parser("batch", help="OpenAI batch jobs")
    batch_commands = p_batch.add_subparsers(dest="batch_command", required=True)
    p_submit = batch_commands.add_parser("submit", help="upload a JSONL batch file and create the batch")
    p_submit.add_argument("path")
    p_submit.add_argument("--endpoint", default=None, help="default: the url of the file's first line")
    p_submit.add_argument("--wait", action="store_true", help="follow the batch with a progress bar, save its files")
    p_submit.set_defaults(run=batch_submit)

    p_search = commands.add_parser("search", help="search a collection")
    p_search.add_argument("query")
    p_search.add_argument("--collection", required=True)
    p_search.add_argument("--top-k", type=int, default=5)
    p_search.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default="hybrid")
    p_search.set_defaults(run=search)

    p_keys = commands.add_parser("keys", help="API keys (needs the admin key)")
    key_commands = p_keys.add_subparsers(dest="keys_command", required=True)
    p_create = key_commands.add_parser("create", help="create a key; prints the secret once")
    p_create.add_argument("name")
    p_create.add_argument("--rpm", type=int, default=0, help="requests per minute (default: no limit)")
    p_create.add_argument("--tpm", type=int, default=0, help="tokens per minute (default: no limit)")
    p_create.add_argument("--models", nargs="*", help="models the key may use (default: all)")
    p_create.add_argument("--expires-in", type=parse_duration, default=None, help="like 3600, 15m, 12h, 30d")
    p_create.set_defaults(run=keys_create)
    key_commands.add_parser("list", help="list keys (never their secrets)").set_defaults(run=keys_list)
    p_revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    p_revoke.add_argument("key_id")
    p_revoke.set_defaults(run=keys_revoke)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
