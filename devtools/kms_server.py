"""A Cloud KMS test server that speaks the real gRPC API (Encrypt, Decrypt) to the official client.

There is no Cloud KMS emulator. This server keeps symmetric CryptoKeys in memory: each key has versions (the newest
is primary), `Encrypt` seals with the primary version and answers with that version's full name, `Decrypt` opens a
ciphertext of any version of the key it names (refusing another key's with INVALID_ARGUMENT, as the real service does)
and says whether the primary was used. The CRC32C fields are filled and checked as the real service does. Calls are
counted per method, faults can be injected, and every plaintext it was given is kept so tests can look for leaks.

Run alone: `python -m devtools.kms_server --port 8086 --key projects/p/locations/global/keyRings/r/cryptoKeys/k`.
(Needs `google-cloud-kms`, which the worker's extra installs.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from collections import Counter

import google_crc32c
import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1 import types

from keychain.testing.grpc_server import ThreadedGrpcServer

log = logging.getLogger(__name__)

SERVICE = "google.cloud.kms.v1.KeyManagementService"
_MAGIC = b"kms1"


def _crc(data: bytes) -> int:
    return google_crc32c.value(data)


def _check_crc(data: bytes, crc: int | None, field: str) -> None:
    """The CRC32C a caller sent with its data, checked as Cloud KMS checks it."""
    if crc is not None and crc != _crc(data):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} does not match")


class CloudKmsTestServer(ThreadedGrpcServer):
    name = "cloud-kms-test-server"

    def __init__(self, *, delay_seconds: float = 0.0):
        self.delay_seconds = delay_seconds
        self.calls: Counter[str] = Counter()
        self.fail_next: dict[str, tuple[grpc.StatusCode, int]] = {}  # method -> (code, times)
        self.plaintexts: list[bytes] = []  # everything it was asked to encrypt (data keys): for leak checks
        self._keys: dict[str, list[bytes]] = {}  # CryptoKey name -> its versions' key material (1-based)
        self._lock = threading.Lock()
        super().__init__()

    # --- keys -------------------------------------------------------------------------------------------------------
    def create_key(self, name: str) -> str:
        """A symmetric CryptoKey (`projects/P/locations/L/keyRings/R/cryptoKeys/K`) with one version."""
        if "/cryptoKeys/" not in name:
            raise ValueError("a CryptoKey name is projects/P/locations/L/keyRings/R/cryptoKeys/K")
        with self._lock:
            self._keys.setdefault(name, []).append(AESGCM.generate_key(bit_length=256))
        return name

    def rotate(self, name: str) -> str:
        """A new primary version of the key; ciphertexts of the earlier versions still decrypt."""
        with self._lock:
            self._keys[name].append(AESGCM.generate_key(bit_length=256))
            return f"{name}/cryptoKeyVersions/{len(self._keys[name])}"

    def fail(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        with self._lock:
            self.fail_next[method] = (code, times)

    # --- the API ----------------------------------------------------------------------------------------------------
    def _encrypt(self, request: types.EncryptRequest) -> types.EncryptResponse:
        plaintext, aad = bytes(request.plaintext), bytes(request.additional_authenticated_data)
        _check_crc(plaintext, request.plaintext_crc32c, "plaintext_crc32c")
        versions = self._versions(request.name)
        number, material = len(versions), versions[-1]
        with self._lock:
            self.plaintexts.append(plaintext)
        nonce = os.urandom(12)
        ciphertext = _MAGIC + number.to_bytes(4, "big") + nonce + AESGCM(material).encrypt(nonce, plaintext, aad or None)
        return types.EncryptResponse(
            name=f"{request.name}/cryptoKeyVersions/{number}", ciphertext=ciphertext,
            ciphertext_crc32c=_crc(ciphertext), verified_plaintext_crc32c=request.plaintext_crc32c is not None,
            protection_level=types.ProtectionLevel.SOFTWARE)

    def _decrypt(self, request: types.DecryptRequest) -> types.DecryptResponse:
        ciphertext, aad = bytes(request.ciphertext), bytes(request.additional_authenticated_data)
        _check_crc(ciphertext, request.ciphertext_crc32c, "ciphertext_crc32c")
        versions = self._versions(request.name)
        number = int.from_bytes(ciphertext[4:8], "big") if ciphertext[:4] == _MAGIC else 0
        if not 1 <= number <= len(versions):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid.")
        try:
            plaintext = AESGCM(versions[number - 1]).decrypt(ciphertext[8:20], ciphertext[20:], aad or None)
        except InvalidTag:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid.") from None
        return types.DecryptResponse(plaintext=plaintext, plaintext_crc32c=_crc(plaintext),
                                     used_primary=number == len(versions),
                                     protection_level=types.ProtectionLevel.SOFTWARE)

    def _versions(self, name: str) -> list[bytes]:
        with self._lock:
            versions = self._keys.get(name)
            if versions is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKey {name} not found")
            return list(versions)

    def _handlers(self) -> grpc.GenericRpcHandler:
        methods = {"Encrypt": (types.EncryptRequest, types.EncryptResponse, self._encrypt),
                   "Decrypt": (types.DecryptRequest, types.DecryptResponse, self._decrypt)}
        return grpc.method_handlers_generic_handler(SERVICE, {
            method: grpc.unary_unary_rpc_method_handler(self._wrap(method, call), request_deserializer=request.deserialize,
                                                        response_serializer=response.serialize)
            for method, (request, response, call) in methods.items()})

    def _wrap(self, method: str, call):
        async def handle(request, context: grpc.aio.ServicerContext):
            with self._lock:
                self.calls[method] += 1
                failing = self.fail_next.get(method)
                if failing is not None:
                    code, times = failing
                    if times <= 1:
                        del self.fail_next[method]
                    else:
                        self.fail_next[method] = (code, times - 1)
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            try:
                if failing is not None:
                    raise _Abort(failing[0], f"injected {failing[0].name}")
                return call(request)
            except _Abort as abort:
                await context.abort(abort.code, abort.message)

        return handle


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8086)
    parser.add_argument("--key", action="append", default=[], help="a CryptoKey to create")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = CloudKmsTestServer().start(args.port, args.host)
    for key in args.key:
        server.create_key(key)
    server.serve_until_interrupted(f"KMS_ENDPOINT={server.address}")


if __name__ == "__main__":
    main()
