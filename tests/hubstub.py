"""A local stand-in for the Hugging Face Hub: what huggingface_hub 2.4's ``create_repo``,
``preupload_lfs_files``, ``create_commit`` and ``whoami`` call, on 127.0.0.1, recording what
arrives (repositories with their visibility, files with their bytes, the tokens used).

Endpoints (read from huggingface_hub/hf_api.py, _commit_api.py and lfs.py):
``POST /api/repos/create``, ``GET /api/whoami-v2``, ``POST /api/validate-yaml``,
``POST /api/models/<ns>/<name>/preupload/<rev>`` (safetensors files are "lfs", others
"regular"), ``POST /<ns>/<name>.git/info/lfs/objects/batch`` (basic transfer: a PUT to this
server), ``PUT /lfs/<oid>``, ``POST /api/models/<ns>/<name>/commit/<rev>`` (NDJSON: header, then
``file`` lines with base64 content and ``lfsFile`` lines naming an uploaded oid).

Uploads through Xet are not served: set ``HF_HUB_DISABLE_XET=1`` (or
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``) so the LFS path is taken.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStub:
    """``with HubStub(token="...") as hub: ... hub.url ...``; ``hub.repos``, ``hub.files``."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, dict[str, Any]] = {}  # repo_id -> {"private": bool, "visibility": ...}
        self.files: dict[str, dict[str, bytes]] = {}  # repo_id -> path -> content
        self.lfs: dict[str, bytes] = {}  # oid -> content
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.auth_seen: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    return self.rfile.read(n)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return b""

            def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                stub.requests.append((self.command, self.path, status))

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                stub.auth_seen.append(auth)
                if auth != f"Bearer {stub.token}":
                    self._send(401, {"error": "Invalid credentials in Authorization header"},
                               {"X-Error-Message": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/api/whoami-v2":
                    if self._authorized():
                        self._send(200, {"type": "user", "name": stub.user, "auth": {"type": "access_token"}})
                    return
                self._send(404, {"error": f"no route {path}"})

            def do_PUT(self) -> None:
                path = self.path.split("?")[0]
                body = self._body()
                if path.startswith("/lfs/"):
                    oid = path.rsplit("/", 1)[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        self._send(400, {"error": "sha256 mismatch"})
                        return
                    stub.lfs[oid] = body
                    self._send(200, {})
                    return
                self._send(404, {"error": f"no route {path}"})

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                body = self._body()
                if path == "/api/repos/create":
                    if not self._authorized():
                        return
                    data = json.loads(body)
                    ns = data.get("organization") or stub.user
                    repo_id = f"{ns}/{data['name']}"
                    if ns != stub.user:
                        self._send(403, {"error": f"You don't have the rights to create a model under {ns}"},
                                   {"X-Error-Message": f"You don't have the rights to create a model under {ns}"})
                        return
                    visibility = data.get("visibility") or ("private" if data.get("private") else "public")
                    if repo_id in stub.repos:
                        self._send(409, {"error": "You already created this model repo", "url": f"{stub.url}/{repo_id}"})
                        return
                    stub.repos[repo_id] = {"private": visibility == "private", "visibility": visibility, "payload": data}
                    stub.files.setdefault(repo_id, {})
                    self._send(200, {"url": f"{stub.url}/{repo_id}", "name": repo_id})
                    return
                if path == "/api/validate-yaml":
                    self._send(200, {"warnings": []})
                    return
                parts = path.strip("/").split("/")
                if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models" and parts[4] in ("preupload", "commit"):
                    if not self._authorized():
                        return
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in stub.repos:
                        self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                        return
                    if parts[4] == "preupload":
                        files = json.loads(body)["files"]
                        self._send(200, {"files": [
                            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                             "shouldIgnore": False, "oid": None} for f in files]})
                        return
                    commit = {"repo_id": repo_id, "files": []}
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "header":
                            commit["header"] = value
                        elif key == "file":
                            content = base64.b64decode(value["content"])
                            stub.files[repo_id][value["path"]] = content
                            commit["files"].append(value["path"])
                        elif key == "lfsFile":
                            content = stub.lfs.get(value["oid"])
                            if content is None or len(content) != value["size"]:
                                self._send(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                                return
                            stub.files[repo_id][value["path"]] = content
                            commit["files"].append(value["path"])
                    stub.commits.append(commit)
                    oid = hashlib.sha1(body).hexdigest()
                    self._send(200, {"commitUrl": f"{stub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                     "pullRequestUrl": None})
                    return
                if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                    if not self._authorized():
                        return
                    data = json.loads(body)
                    objects = []
                    for obj in data["objects"]:
                        entry = {"oid": obj["oid"], "size": obj["size"]}
                        if obj["oid"] not in stub.lfs:
                            entry["actions"] = {"upload": {"href": f"{stub.url}/lfs/{obj['oid']}", "header": {}}}
                        objects.append(entry)
                    self._send(200, {"transfer": "basic", "objects": objects})
                    return
                self._send(404, {"error": f"no route {path}"})

        return Handler
