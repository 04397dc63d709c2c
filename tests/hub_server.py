"""A local stand-in for the Hugging Face Hub HTTP API: just what huggingface_hub 2.4's
`HfApi.create_repo` and `HfApi.upload_folder` call, so the real client can push to it.

Endpoints (all JSON unless noted; every /api and LFS-batch call must carry `Authorization:
Bearer <token>`, else 401):

- `GET  /api/whoami-v2`: the user (`name` = the default namespace).
- `GET  /api/agent-harnesses`: an empty registry (the client fetches it best-effort, unauthenticated).
- `POST /api/repos/create`: {name, organization, visibility|private, type} -> {url}; 409 when
  the repository exists (the client's `exist_ok=True` accepts that).
- `POST /api/validate-yaml`: {content, repoType}: the README's front matter must parse as a
  model card whose `model-index` reads back into EvalResults; else 400 with `errors`.
- `POST /api/models/{ns}/{name}/preupload/{rev}`: {files: [{path, sample, size}]} -> the upload
  mode of each file: "regular" (content goes base64 in the commit), or "lfs" for paths matching
  `lfs_suffixes` (then the client uses the LFS protocol below; with `hf_xet` installed the
  client would upload "lfs" files through Xet, which this server does not speak, so tests
  that use LFS set HF_HUB_DISABLE_XET=1).
- `POST /{ns}/{name}.git/info/lfs/objects/batch`: LFS batch API (basic transfer) -> an upload
  href and a verify href per object.
- `PUT  /lfs-objects/{oid}`: the object's bytes (Content-Length or chunked); sha256 checked.
- `POST /lfs-verify`: {oid, size} -> 200 when that object was stored.
- `POST /api/models/{ns}/{name}/commit/{rev}`: NDJSON (header, file with base64 content,
  lfsFile by oid, deletedFile) -> {commitUrl, commitOid}; files are stored in the repository.

`HubServer.requests` records (method, path) of every request; `repos` holds what arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    repo_id: str
    visibility: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)  # files committed as LFS pointers


class HubServer:
    """Start with `with HubServer(token="hf_dummy") as hub:`; `hub.url` is the endpoint."""

    def __init__(self, token: str, user: str = "tester", lfs_suffixes: tuple[str, ...] = ()) -> None:
        self.token, self.user, self.lfs_suffixes = token, user, lfs_suffixes
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # ------------------------------------------------------------------ plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._send(status, {"error": message}, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})})

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _dispatch(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
            body = self._body()
            parts = path.strip("/").split("/")
            try:
                if method == "PUT" and parts[0] == "lfs-objects":
                    return self._lfs_put(parts[1], body)
                if method == "POST" and path == "/lfs-verify":
                    return self._lfs_verify(json.loads(body))
                if method == "GET" and path == "/api/agent-harnesses":  # the client's best-effort telemetry registry
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                if not self._authorized():
                    return None
                if method == "GET" and path == "/api/whoami-v2":
                    return self._send(200, {"type": "user", "name": hub.user, "orgs": [], "auth": {"type": "access_token"}})
                if method == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(body))
                if method == "POST" and path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                    return self._lfs_batch(path[1 : -len(".git/info/lfs/objects/batch")], json.loads(body))
                if method == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                    repo_id, action = f"{parts[2]}/{parts[3]}", parts[4]
                    if repo_id not in hub.repos:
                        return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
                    if action == "preupload":
                        return self._preupload(json.loads(body))
                    return self._commit(hub.repos[repo_id], body)
            except (ValueError, KeyError) as err:  # malformed request: a client bug would show here
                return self._error(400, f"bad request: {err!r}")
            return self._error(404, f"stand-in Hub: no route for {method} {path}")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # ------------------------------------------------------------------ endpoints
        def _create(self, payload: dict[str, Any]) -> None:
            if payload.get("type") not in (None, "model"):
                return self._error(400, "this stand-in only hosts model repositories")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                visibility = payload.get("visibility") or ({True: "private", False: "public"}.get(payload.get("private")))
                hub.repos[repo_id] = Repo(repo_id, visibility)
            return self._send(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            from huggingface_hub import ModelCard

            try:
                card = ModelCard(payload["content"])
                for result in card.data.eval_results or []:
                    assert result.task_type and result.dataset_type and result.metric_type
            except Exception as err:  # noqa: BLE001 (any parse failure is the client's invalid metadata)
                return self._send(400, {"errors": [{"message": f"invalid metadata: {err}"}]})
            return self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, payload: dict[str, Any]) -> None:
            files = []
            for item in payload["files"]:
                base64.b64decode(item["sample"])
                lfs = item["path"].endswith(hub.lfs_suffixes) if hub.lfs_suffixes else False
                files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
            return self._send(200, {"files": files, "commitOid": "0" * 40})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if repo_id not in hub.repos:
                return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                return self._error(400, "only basic uploads are supported")
            objects = [
                {"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{hub.url}/lfs-objects/{o['oid']}"},
                    "verify": {"href": f"{hub.url}/lfs-verify"},
                }}
                for o in payload["objects"]
            ]
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, f"content does not hash to {oid}")
            with hub.lock:
                hub.lfs_objects[oid] = body
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None

        def _lfs_verify(self, payload: dict[str, Any]) -> None:
            stored = hub.lfs_objects.get(payload["oid"])
            if stored is None or len(stored) != payload["size"]:
                return self._error(404, f"object {payload['oid']} not uploaded")
            return self._send(200, {})

        def _commit(self, repo: Repo, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]
            if header.get("key") != "header":
                return self._error(400, "the commit payload must start with its header")
            changes: dict[str, bytes | None] = {}
            lfs: set[str] = set()
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    stored = hub.lfs_objects.get(value["oid"])
                    if stored is None or len(stored) != value["size"]:
                        return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    changes[value["path"]] = stored
                    lfs.add(value["path"])
                elif line["key"] == "deletedFile":
                    changes[value["path"]] = None
                else:
                    return self._error(400, f"unsupported commit operation {line['key']!r}")
            with hub.lock:
                for path, content in changes.items():
                    if content is None:
                        repo.files.pop(path, None)
                    else:
                        repo.files[path] = content
                repo.lfs_paths |= lfs
                oid = hashlib.sha1(body).hexdigest()
                repo.commits.append({"oid": oid, "summary": header["value"].get("summary"), "paths": sorted(changes)})
            return self._send(200, {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    return Handler
