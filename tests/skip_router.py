"""A SKIP client as a router or switch runs it, written from IETF draft-cisco-skip alone:
the Python standard library only, nothing of qkdd (so it cannot share qkdd's mistakes).

The draft's methods, all GET over HTTPS, each answered with a JSON object:

    /capabilities                          entropy, key (booleans), algorithm,
                                           localSystemID, remoteSystemID (a list)
    /key?remoteSystemID=ID[&size=BITS]     keyId, key: a new key shared with system ID
    /key/{keyId}?remoteSystemID=ID         keyId, key: the key system ID's client was given
    /entropy[?minentropy=BITS]             randomStr, minentropy

Keys, key IDs and random strings are hexadecimal; sizes are in bits (256 by default).
Every answer's fields and their types are checked here; a status other than 200 raises
`SkipStatusError` with the status and the body.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
from typing import Any
from urllib.parse import quote, urlencode

HEX = re.compile(r"[0-9A-Fa-f]+")


class SkipStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


class SkipRouter:
    """One router's SKIP client: its certificate and key, the CA that issued the key
    provider's certificate, the key provider's address."""

    def __init__(self, host: str, port: int, *, cert: str, key: str, ca: str) -> None:
        self.host, self.port = host, port
        self.context = ssl.create_default_context(cafile=ca)
        self.context.load_cert_chain(cert, key)

    def get(self, path: str, **params: str | int) -> dict[str, Any]:
        query = f"?{urlencode(params)}" if params else ""
        connection = http.client.HTTPSConnection(
            self.host, self.port, context=self.context, timeout=30
        )
        try:
            connection.request("GET", path + query, headers={"Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise SkipStatusError(response.status, body)
        assert response.getheader("Content-Type", "").startswith("application/json")
        answer = json.loads(body)
        assert isinstance(answer, dict), answer
        return answer

    def capabilities(self) -> dict[str, Any]:
        caps = self.get("/capabilities")
        assert isinstance(caps["entropy"], bool) and isinstance(caps["key"], bool), caps
        assert isinstance(caps["algorithm"], str), caps
        assert isinstance(caps["localSystemID"], str) and caps["localSystemID"], caps
        remote = caps["remoteSystemID"]
        assert isinstance(remote, list) and all(isinstance(r, str) for r in remote), caps
        return caps

    def new_key(self, remote_system_id: str, size: int | None = None) -> tuple[str, bytes]:
        """(keyId, key) of a new key shared with ``remote_system_id``."""
        params: dict[str, str | int] = {"remoteSystemID": remote_system_id}
        if size is not None:
            params["size"] = size
        answer = self.get("/key", **params)
        key_id, key = self._key(answer)
        assert len(key) * 8 == (size or 256), (len(key), size)
        return key_id, key

    def key_by_id(self, key_id: str, remote_system_id: str) -> bytes:
        """The key ``remote_system_id``'s client was given under ``key_id``."""
        answer = self.get(f"/key/{quote(key_id, safe='')}", remoteSystemID=remote_system_id)
        got_id, key = self._key(answer)
        assert got_id.lower() == key_id.lower(), (got_id, key_id)
        return key

    def entropy(self, minentropy: int | None = None) -> bytes:
        answer = self.get("/entropy", **({} if minentropy is None else {"minentropy": minentropy}))
        random, bits = answer["randomStr"], answer["minentropy"]
        assert isinstance(random, str) and HEX.fullmatch(random), answer
        assert isinstance(bits, int) and bits == (minentropy or 256), answer
        material = bytes.fromhex(random)
        assert len(material) * 8 >= bits, answer
        return material

    @staticmethod
    def _key(answer: dict[str, Any]) -> tuple[str, bytes]:
        key_id, key = answer["keyId"], answer["key"]
        assert isinstance(key_id, str) and HEX.fullmatch(key_id), answer
        assert isinstance(key, str) and HEX.fullmatch(key) and len(key) % 2 == 0, answer
        return key_id, bytes.fromhex(key)
