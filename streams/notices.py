"""Secret Manager notifications: validated from Pub/Sub, carried on Kafka, and what each one invalidates.

See docs/secret-manager-notifications.md. Be liberal in what is accepted: a version event without
`versionId` takes the version from the data's `name`; a missing `timestamp` falls back to the publish time.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from keychain.errors import InvalidReference
from keychain.invalidation import Selection
from keychain.refs import SecretIdentity, SecretRef

from . import metrics
from .events import BadEvent

log = logging.getLogger(__name__)

VERSION_EVENTS = frozenset({
    "SECRET_VERSION_ADD", "SECRET_VERSION_ENABLE", "SECRET_VERSION_DISABLE", "SECRET_VERSION_DESTROY",
    "SECRET_VERSION_DESTROY_SCHEDULED",
})
SECRET_EVENTS = frozenset({"SECRET_CREATE", "SECRET_UPDATE", "SECRET_DELETE", "SECRET_ROTATE"})
IGNORED = frozenset({"TOPIC_CONFIGURED"})
# An event type Google may add (as it added SECRET_VERSION_DESTROY_SCHEDULED): acknowledged and counted, not
# dead-lettered. Anything else in eventType is a malformed notice.
_EVENT_TYPE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_UNKNOWN_LOGGED: set[str] = set()  # each new type is logged once (at most MAX_UNKNOWN_LOGGED of them)
MAX_UNKNOWN_LOGGED = 32


class RotationNotice(BaseModel):
    """A notification as the bridge puts it on KEYCHAIN_ROTATIONS_TOPIC (key = the secret's identity, so that the
    notices of one secret share a partition, and another project's secret of the same id is another key)."""

    notice_id: str = Field(min_length=1, max_length=200, description="Pub/Sub message id: duplicates share it")
    event_type: str = Field(description="A Secret Manager event type (VERSION_EVENTS or SECRET_EVENTS)")
    secret: str = Field(description="projects/P/secrets/S as the notification named it")
    version: str | None = Field(default=None, description="projects/P/secrets/S/versions/N for version events")
    occurred_at: datetime = Field(description="When Secret Manager says it happened")

    @field_validator("event_type")
    @classmethod
    def _known(cls, value: str) -> str:
        # Whatever reaches the rotations topic, the event type becomes a metric label: only a closed set is let in.
        if value not in VERSION_EVENTS | SECRET_EVENTS:
            raise ValueError("not a Secret Manager event type")
        return value

    @property
    def identity(self) -> SecretIdentity:
        """The secret's identity: Secret Manager names a notice's secret by project number."""
        return SecretRef.parse(self.secret).identity()

    @property
    def version_number(self) -> str | None:
        return SecretRef.parse(self.version).version if self.version else None

    def match(self) -> dict[str, Any] | None:
        """Which rows this notice makes wrong, as a containment pattern on `sources` (None: none)."""
        kind = self.event_type
        if kind == "SECRET_VERSION_ADD":
            return {"pinned": False}  # rows through `latest` or an alias; pinned rows stay valid
        if kind in ("SECRET_VERSION_DISABLE", "SECRET_VERSION_DESTROY", "SECRET_VERSION_DESTROY_SCHEDULED"):
            return {"version": self.version_number}  # that version, pinned or through `latest`
        if kind == "SECRET_DELETE":
            return {}
        if kind == "SECRET_UPDATE":
            return {"alias": True}
        return None

    def selection(self) -> Selection | None:
        """What this notice invalidates (None: nothing). A version added tells which version is current now."""
        match = self.match()
        if match is None:
            return None
        added = self.version_number if self.event_type == "SECRET_VERSION_ADD" else None
        return Selection.named_secret(SecretRef.parse(self.secret), match, added_version=added)

    def to_kafka(self) -> tuple[bytes, bytes]:
        return self.identity.key.encode(), self.model_dump_json().encode()


def notice_from_pubsub(
    message_id: str, attributes: dict[str, str], data: bytes, publish_time: datetime | None
) -> RotationNotice | None:
    """Validate one Pub/Sub message. None for a notice that needs no forwarding: TOPIC_CONFIGURED, and an event type
    of Google's that this bridge does not know yet (acknowledged, counted, logged once)."""
    event_type = attributes.get("eventType", "")
    if event_type in IGNORED:
        metrics.NOTICES_NOT_FORWARDED.labels("topic_configured").inc()
        return None
    if not _EVENT_TYPE.match(event_type):
        raise BadEvent("invalid_notice", "eventType is not a Secret Manager event type")
    secret_id = attributes.get("secretId", "")
    try:
        secret = SecretRef.parse(secret_id)
    except InvalidReference:
        raise BadEvent("invalid_notice", "secretId is not projects/P/secrets/S or projects/P/locations/L/secrets/S") from None
    if secret.secret_name != secret_id:
        raise BadEvent("invalid_notice", "secretId is not projects/P/secrets/S or projects/P/locations/L/secrets/S")
    if event_type not in VERSION_EVENTS | SECRET_EVENTS:
        metrics.NOTICES_NOT_FORWARDED.labels("unknown_event_type").inc()
        if event_type not in _UNKNOWN_LOGGED and len(_UNKNOWN_LOGGED) < MAX_UNKNOWN_LOGGED:
            _UNKNOWN_LOGGED.add(event_type)
            log.warning("Secret Manager event type %s is not known to this bridge: acknowledged, nothing invalidated "
                        "(keychain_notices_not_forwarded_total{reason=\"unknown_event_type\"})", event_type)
        return None
    version = None
    if event_type in VERSION_EVENTS:
        version = attributes.get("versionId") or _name_from_data(data)
        try:
            parsed = SecretRef.parse(version or "")
        except InvalidReference:
            raise BadEvent("invalid_notice", "a version event needs versionId (or the version's name in data)") from None
        if not parsed.pinned or parsed.secret_name != secret.secret_name:
            raise BadEvent("invalid_notice", "versionId does not name a numbered version of secretId")
    occurred = _timestamp(attributes.get("timestamp")) or publish_time or datetime.now(timezone.utc)
    try:
        return RotationNotice(
            notice_id=message_id, event_type=event_type, secret=attributes["secretId"], version=version,
            occurred_at=occurred,
        )
    except ValidationError as exc:
        raise BadEvent("invalid_notice", "; ".join(e["msg"] for e in exc.errors()[:3])) from None


def notice_from_kafka(value: bytes | None) -> RotationNotice:
    try:
        return RotationNotice.model_validate_json(value or b"")
    except ValidationError as exc:
        raise BadEvent("invalid_notice", "; ".join(e["msg"] for e in exc.errors()[:3])) from None


def _name_from_data(data: bytes) -> str | None:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = document.get("name") if isinstance(document, dict) else None
    return name if isinstance(name, str) else None


def _timestamp(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
