"""A Secret Manager test server that speaks the real gRPC API to the official client.

There is no Secret Manager emulator. This server keeps secrets in memory, names them the way the real service does
(the project by NUMBER in every name it returns, `latest` = the most recently created version), serves several
projects (`add_project`: organisations run the same secret ids in prod and staging), regional secrets (`projects/P/locations/L/secrets/S`, every location at its one address), injects latency and
faults so tests and benchmarks can model the real service, and publishes the same Pub/Sub notifications the real
service publishes (`docs/secret-manager-notifications.md`) when given a topic.

Run alone: `python -m keychain.testing.secret_manager_server --port 8085 --delay-ms 250`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import google_crc32c
import grpc
from google.cloud.secretmanager_v1 import types
from google.protobuf import empty_pb2, field_mask_pb2, timestamp_pb2

from .grpc_server import ThreadedGrpcServer

log = logging.getLogger(__name__)

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
DEFAULT_PROJECT_ID = "test-project"
DEFAULT_PROJECT_NUMBER = "1014428265962"  # the seed's project number


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Fault:
    """Answer `code` instead of the real answer, for the next `times` calls (None = every call), with `rate`."""

    code: grpc.StatusCode
    method: str = "AccessSecretVersion"
    times: int | None = None
    rate: float = 1.0
    secret: str | None = None  # only calls naming this secret (its id: `S`, or `L/S` for a regional one)


@dataclass
class _Version:
    number: int
    payload: bytes = field(repr=False)
    state: str = "ENABLED"
    create_time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def _path(key: str) -> str:
    """`S` -> `secrets/S`; `L/S` (a regional secret) -> `locations/L/secrets/S`."""
    location, _, secret = key.rpartition("/")
    return f"locations/{location}/secrets/{secret}" if location else f"secrets/{secret}"


def _key(secret_id: str, location: str | None) -> str:
    return f"{location}/{secret_id}" if location else secret_id


@dataclass
class _Secret:
    secret_id: str  # its key: `S`, or `L/S` for a regional secret
    project: str  # its project's number
    topics: list[str]
    labels: dict[str, str]
    aliases: dict[str, int] = field(default_factory=dict)
    versions: list[_Version] = field(default_factory=list)
    create_time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class SecretManagerTestServer(ThreadedGrpcServer):
    name = "secret-manager-test-server"

    def __init__(
        self,
        *,
        project_id: str = DEFAULT_PROJECT_ID,
        project_number: str = DEFAULT_PROJECT_NUMBER,
        notify_topic: str | None = None,
        delay_seconds: float = 0.0,
    ):
        self.project_id = project_id
        self.project_number = project_number
        self.projects: dict[str, str] = {project_id: project_number}  # every project it serves: id -> number
        self.notify_topic = notify_topic
        self.delay_seconds = delay_seconds
        self.corrupt_crc32c = False
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, resource name asked for, status code name), in order
        self.log_times: list[float] = []  # when each entry of `log` was answered (time.time())
        self.issued: list[bytes] = []  # every payload ever stored, so tests can look for plaintext leaks
        self._held: dict[str, threading.Event] = {}  # secret id -> released (see hold)
        self.holding: Counter[str] = Counter()  # access calls of each secret waiting on a hold now
        self._secrets: dict[tuple[str, str], _Secret] = {}  # by (project number, key)
        self._lock = threading.Lock()
        self._publisher = None
        super().__init__()

    def stop(self) -> None:
        super().stop()
        if self._publisher is not None:
            self._publisher.stop()

    # --- controls for tests ---------------------------------------------------------------------------------------
    def inject(self, code: grpc.StatusCode, **kwargs) -> Fault:
        fault = Fault(code, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            held, self._held = list(self._held.values()), {}
        for gate in held:
            gate.set()
        self.corrupt_crc32c = False
        self.delay_seconds = 0.0

    def hold(self, secret_id: str) -> None:
        """Access calls of this secret wait (counted in `holding`) until `release`: a call in flight for as long as a
        test needs."""
        with self._lock:
            self._held[secret_id] = threading.Event()

    def release(self, secret_id: str) -> None:
        with self._lock:
            gate = self._held.pop(secret_id, None)
        if gate is not None:
            gate.set()

    def add_project(self, project_id: str, project_number: str) -> None:
        """Serve another project (by its id and its number) beside the default one."""
        with self._lock:
            self.projects[project_id] = project_number

    def access_count(self, secret_id: str | None = None, code: str | None = "OK", *, location: str | None = None,
                     project: str | None = None) -> int:
        """AccessSecretVersion calls (of one secret, of every project or of `project` (its id); with one outcome,
        `None` = any outcome)."""
        wanted = f"/{_path(_key(secret_id, location))}/" if secret_id else ""
        spellings = None if project is None else (f"projects/{project}/", f"projects/{self.projects[project]}/")
        with self._lock:
            return sum(
                1 for method, name, outcome in self.log
                if method == "AccessSecretVersion"
                and (not wanted or wanted in name and (location or "/locations/" not in name))
                and (spellings is None or name.startswith(spellings))
                and (code is None or outcome == code)
            )

    def create_secret(self, secret_id: str, *, topics: list[str] | None = None, location: str | None = None,
                      project: str | None = None) -> str:
        secret = types.Secret(topics=[types.Topic(name=t) for t in topics or []])
        parent = f"projects/{project or self.project_id}" + (f"/locations/{location}" if location else "")
        return self._create_secret(parent, secret_id, secret).name

    def add_version(self, secret_id: str, payload: bytes | str, *, location: str | None = None,
                    project: str | None = None) -> str:
        data = payload.encode() if isinstance(payload, str) else payload
        parent = f"projects/{project or self.project_id}/{_path(_key(secret_id, location))}"
        return self._add_version(parent, types.SecretPayload(data=data)).name

    def set_state(self, version_name: str, state: str) -> None:
        action = {"ENABLED": "Enable", "DISABLED": "Disable", "DESTROYED": "Destroy"}[state]
        self._change_state(version_name, action)

    # --- names --------------------------------------------------------------------------------------------------
    def _project(self, project: str) -> str:
        """A project's number, from its id or its number."""
        if project in self.projects:
            return self.projects[project]
        if project in self.projects.values():
            return project
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"Permission denied on project {project}")

    @staticmethod
    def _secret_name(secret: _Secret) -> str:
        return f"projects/{secret.project}/{_path(secret.secret_id)}"

    def _parse(self, name: str, *, version: bool) -> tuple[tuple[str, str], str | None]:
        """A secret's (or with `version`, a version's) name: ((its project's number, the secret's key), the version
        asked for)."""
        parts = name.split("/")
        location = None
        if len(parts) > 3 and parts[2] == "locations":
            location, parts = parts[3], parts[:2] + parts[4:]
        if version and (len(parts) != 6 or parts[0] != "projects" or parts[2] != "secrets" or parts[4] != "versions"):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value in the request: {name}")
        if not version and (len(parts) != 4 or parts[0] != "projects" or parts[2] != "secrets"):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value in the request: {name}")
        number = self._project(parts[1])
        return (number, _key(parts[3], location)), (parts[5] if version else None)

    def _get_secret(self, stored: tuple[str, str]) -> _Secret:
        secret = self._secrets.get(stored)
        if secret is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND,
                           f"Secret [projects/{stored[0]}/{_path(stored[1])}] not found.")
        return secret

    def _get_version(self, name: str) -> tuple[_Secret, _Version]:
        secret_id, wanted = self._parse(name, version=True)
        secret = self._get_secret(secret_id)
        number: int | None
        if wanted == "latest":
            number = secret.versions[-1].number if secret.versions else None
        elif wanted.isdigit():
            number = int(wanted)
        else:
            number = secret.aliases.get(wanted)
        version = next((v for v in secret.versions if v.number == number), None)
        if version is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found.")
        return secret, version

    # --- resources as protos ----------------------------------------------------------------------------------------
    def _secret_proto(self, secret: _Secret) -> types.Secret:
        return types.Secret(
            name=self._secret_name(secret),
            create_time=_ts(secret.create_time),
            labels=secret.labels,
            topics=[types.Topic(name=t) for t in secret.topics],
            version_aliases=secret.aliases,
            replication=types.Replication(automatic=types.Replication.Automatic()),
        )

    def _version_proto(self, secret: _Secret, version: _Version) -> types.SecretVersion:
        return types.SecretVersion(
            name=f"{self._secret_name(secret)}/versions/{version.number}",
            create_time=_ts(version.create_time),
            state=types.SecretVersion.State[version.state],
            client_specified_payload_checksum=True,
        )

    # --- notifications --------------------------------------------------------------------------------------------
    def _notify(self, secret: _Secret, event_type: str, resource, extra: dict[str, str] | None = None) -> None:
        topics = list(dict.fromkeys(secret.topics + ([self.notify_topic] if self.notify_topic else [])))
        if not topics:
            return
        if self._publisher is None:
            from google.cloud import pubsub_v1

            self._publisher = pubsub_v1.PublisherClient()
        attributes = {
            "eventType": event_type,
            "secretId": self._secret_name(secret),
            "dataFormat": "JSON_API_V1",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            **(extra or {}),
        }
        data = type(resource).to_json(
            resource, use_integers_for_enums=False, preserving_proto_field_name=False, indent=None
        ).encode()
        for topic in topics:
            self._publisher.publish(topic, data, **attributes)

    # --- the RPCs -------------------------------------------------------------------------------------------------
    def _create_secret(self, parent: str, secret_id: str, secret: types.Secret) -> types.Secret:
        parts = parent.split("/")
        number = self._project(parts[1])
        if len(parts) == 4 and parts[2] == "locations":
            secret_id = _key(secret_id, parts[3])
        elif len(parts) != 2:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value in the request: {parent}")
        with self._lock:
            stored = _Secret(secret_id, number, [t.name for t in secret.topics], dict(secret.labels))
            if (number, secret_id) in self._secrets:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"Secret [{self._secret_name(stored)}] already exists.")
            self._secrets[(number, secret_id)] = stored
        proto = self._secret_proto(stored)
        self._notify(stored, "SECRET_CREATE", proto)
        return proto

    def _add_version(self, parent: str, payload: types.SecretPayload) -> types.SecretVersion:
        secret_id, _ = self._parse(parent, version=False)
        if "data_crc32c" in payload and google_crc32c.value(payload.data) != payload.data_crc32c:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Checksum mismatch.")
        with self._lock:
            secret = self._get_secret(secret_id)
            version = _Version(len(secret.versions) + 1, payload.data)
            secret.versions.append(version)
            self.issued.append(payload.data)
        proto = self._version_proto(secret, version)
        self._notify(secret, "SECRET_VERSION_ADD", proto, {"versionId": proto.name})
        return proto

    def _change_state(self, name: str, action: str) -> types.SecretVersion:
        with self._lock:
            secret, version = self._get_version(name)
            if version.state == "DESTROYED":
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"Secret Version [{name}] is destroyed.")
            version.state = {"Enable": "ENABLED", "Disable": "DISABLED", "Destroy": "DESTROYED"}[action]
            if action == "Destroy":
                version.payload = b""
        proto = self._version_proto(secret, version)
        event = {"Enable": "SECRET_VERSION_ENABLE", "Disable": "SECRET_VERSION_DISABLE", "Destroy": "SECRET_VERSION_DESTROY"}
        self._notify(secret, event[action], proto, {"versionId": proto.name})
        return proto

    async def _access(self, request: types.AccessSecretVersionRequest) -> types.AccessSecretVersionResponse:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        (_, secret_id), _ = self._parse(request.name, version=True)
        with self._lock:
            gate = self._held.get(secret_id)
        if gate is not None:
            self.holding[secret_id] += 1
            try:
                while not gate.is_set():
                    await asyncio.sleep(0.01)
            finally:
                self.holding[secret_id] -= 1
        with self._lock:
            secret, version = self._get_version(request.name)
            name = f"{self._secret_name(secret)}/versions/{version.number}"
            if version.state != "ENABLED":
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"Secret Version [{name}] is in {version.state} state.")
            payload = version.payload
        checksum = google_crc32c.value(payload) ^ (1 if self.corrupt_crc32c else 0)
        return types.AccessSecretVersionResponse(
            name=name, payload=types.SecretPayload(data=payload, data_crc32c=checksum)
        )

    def _update_secret(self, secret: types.Secret, mask: field_mask_pb2.FieldMask) -> types.Secret:
        secret_id, _ = self._parse(secret.name, version=False)
        with self._lock:
            stored = self._get_secret(secret_id)
            paths = set(mask.paths) or {"labels", "topics", "version_aliases"}
            if "labels" in paths:
                stored.labels = dict(secret.labels)
            if "topics" in paths:
                stored.topics = [t.name for t in secret.topics]
            if "version_aliases" in paths:
                stored.aliases = {k: int(v) for k, v in secret.version_aliases.items()}
        proto = self._secret_proto(stored)
        self._notify(stored, "SECRET_UPDATE", proto)
        return proto

    def _delete_secret(self, name: str) -> empty_pb2.Empty:
        secret_id, _ = self._parse(name, version=False)
        with self._lock:
            secret = self._get_secret(secret_id)
            del self._secrets[secret_id]
        self._notify(secret, "SECRET_DELETE", self._secret_proto(secret), {"deleteType": "REQUESTED"})
        return empty_pb2.Empty()

    def _list_versions(self, parent: str) -> types.ListSecretVersionsResponse:
        secret_id, _ = self._parse(parent, version=False)
        with self._lock:
            secret = self._get_secret(secret_id)
            versions = [self._version_proto(secret, v) for v in reversed(secret.versions)]
        return types.ListSecretVersionsResponse(versions=versions, total_size=len(versions))

    def _get_version_rpc(self, name: str) -> types.SecretVersion:
        with self._lock:
            return self._version_proto(*self._get_version(name))

    def _get_secret_rpc(self, name: str) -> types.Secret:
        secret_id, _ = self._parse(name, version=False)
        with self._lock:
            return self._secret_proto(self._get_secret(secret_id))

    def _handlers(self) -> grpc.GenericRpcHandler:
        t = types
        methods = {
            "CreateSecret": (t.CreateSecretRequest, t.Secret, lambda r: self._create_secret(r.parent, r.secret_id, r.secret)),
            "GetSecret": (t.GetSecretRequest, t.Secret, lambda r: self._get_secret_rpc(r.name)),
            "UpdateSecret": (t.UpdateSecretRequest, t.Secret, lambda r: self._update_secret(r.secret, r.update_mask)),
            "DeleteSecret": (t.DeleteSecretRequest, None, lambda r: self._delete_secret(r.name)),
            "AddSecretVersion": (t.AddSecretVersionRequest, t.SecretVersion, lambda r: self._add_version(r.parent, r.payload)),
            "GetSecretVersion": (t.GetSecretVersionRequest, t.SecretVersion, lambda r: self._get_version_rpc(r.name)),
            "ListSecretVersions": (t.ListSecretVersionsRequest, t.ListSecretVersionsResponse, lambda r: self._list_versions(r.parent)),
            "AccessSecretVersion": (t.AccessSecretVersionRequest, t.AccessSecretVersionResponse, self._access),
            "DisableSecretVersion": (t.DisableSecretVersionRequest, t.SecretVersion, lambda r: self._change_state(r.name, "Disable")),
            "EnableSecretVersion": (t.EnableSecretVersionRequest, t.SecretVersion, lambda r: self._change_state(r.name, "Enable")),
            "DestroySecretVersion": (t.DestroySecretVersionRequest, t.SecretVersion, lambda r: self._change_state(r.name, "Destroy")),
        }
        handlers = {}
        for method, (request_type, response_type, call) in methods.items():
            serializer = response_type.serialize if response_type is not None else empty_pb2.Empty.SerializeToString
            handlers[method] = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, call), request_deserializer=request_type.deserialize, response_serializer=serializer
            )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrap(self, method: str, call):
        async def handle(request, context: grpc.aio.ServicerContext):
            self.calls[method] += 1
            name = getattr(request, "name", "") or getattr(request, "parent", "")
            fault = self._due_fault(method, name)
            try:
                if fault is not None:
                    raise RpcError(fault.code, f"injected {fault.code.name}")
                result = call(request)
                if asyncio.iscoroutine(result):
                    result = await result
            except RpcError as exc:
                self._record(method, name, exc.code.name)
                await context.abort(exc.code, exc.message)
            self._record(method, name, "OK")
            return result

        return handle

    def _record(self, method: str, name: str, code: str) -> None:
        with self._lock:
            self.log.append((method, name, code))
            self.log_times.append(time.time())

    def _due_fault(self, method: str, name: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method != method or (fault.secret and f"/{_path(fault.secret)}/" not in name + "/"):
                    continue
                if fault.times is not None and fault.times <= 0:
                    continue
                if random.random() >= fault.rate:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 where other containers reach it by name)")
    parser.add_argument("--port", type=int, default=8085)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency added to every AccessSecretVersion")
    parser.add_argument("--project-id", default=DEFAULT_PROJECT_ID)
    parser.add_argument("--project-number", default=DEFAULT_PROJECT_NUMBER)
    parser.add_argument("--notify-topic", help="Pub/Sub topic for notifications (needs PUBSUB_EMULATOR_HOST locally)")
    parser.add_argument("--secret", action="append", default=[], metavar="ID=VALUE", help="create a secret version")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = SecretManagerTestServer(
        project_id=args.project_id,
        project_number=args.project_number,
        notify_topic=args.notify_topic,
        delay_seconds=args.delay_ms / 1000,
    ).start(args.port, args.host)
    for item in args.secret:
        secret_id, _, value = item.partition("=")
        server.create_secret(secret_id)
        server.add_version(secret_id, value)
    server.serve_until_interrupted(f"SECRET_MANAGER_ENDPOINT={server.address}")


if __name__ == "__main__":
    main()
