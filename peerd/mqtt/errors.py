"""The errors of the broker link: one branch of the PeerdError hierarchy."""

from __future__ import annotations

from peerd.errors import ConfigError, PeerdError

__all__ = [
    "CONNACK_REASONS",
    "BrokerError",
    "BrokerLimitError",
    "BrokerProtocolError",
    "BrokerQueueFull",
    "BrokerRefused",
    "BrokerSettingsError",
    "BrokerTimeout",
    "BrokerTlsError",
    "BrokerUnreachable",
    "LinkClosed",
    "SubscribeRefused",
]

# CONNACK refusals: MQTT 3.1.1 return codes and MQTT 5 reason codes.
CONNACK_REASONS = {
    1: "the broker does not accept MQTT 3.1.1",
    2: "the broker rejected the client id",
    3: "the broker is unavailable",
    4: "bad username or password",
    5: "not authorised",
    0x80: "unspecified error",
    0x81: "the broker found our CONNECT malformed",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "the broker does not accept this MQTT version",
    0x85: "the broker rejected the client id",
    0x86: "bad username or password",
    0x87: "not authorised",
    0x88: "the broker is unavailable",
    0x89: "the broker is busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}
# Refusals that may pass with time (3.1.1 server unavailable; MQTT 5 unavailable, busy, quota,
# rate): retried with backoff, not reported as permanent.
TRANSIENT_REFUSALS = frozenset({3, 0x80, 0x83, 0x88, 0x89, 0x97, 0x9F})


class BrokerError(PeerdError):
    """The MQTT broker could not be reached, refused us, or broke the protocol."""

    hint = "check the broker URL, that the broker is running, and the credentials"
    # True when retrying with the same settings cannot succeed (bad credentials, untrusted
    # certificate): `MqttLink.wait_connected` raises at once instead of waiting.
    permanent = False


class BrokerSettingsError(BrokerError, ConfigError):
    """The broker URL or one of its options is invalid."""

    hint = "fix the broker URL or options in the configuration"
    permanent = True


class BrokerUnreachable(BrokerError):
    """No TCP (or TLS) connection to the broker could be made, or it dropped."""


class BrokerRefused(BrokerError):
    """The broker answered CONNECT with a refusal (CONNACK return code `code`)."""

    def __init__(self, message: str, *, code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.permanent = code not in TRANSIENT_REFUSALS


class BrokerTlsError(BrokerError):
    """The TLS handshake with the broker failed (untrusted certificate, wrong name...)."""

    hint = "check the broker's certificate and the CA file given for it"


class BrokerTimeout(BrokerError):
    """A wait on the broker (connect, publish, subscribe) exceeded its limit."""


class BrokerQueueFull(BrokerError):
    """The outbox that holds publishes while the broker is unreachable is full."""

    hint = "the broker has been unreachable for a while; retry when it is back"


class BrokerProtocolError(BrokerError):
    """The broker sent bytes that break MQTT 3.1.1; the connection was dropped."""


class LinkClosed(BrokerError):
    """The link was closed while an operation waited on it."""

    hint = ""


class SubscribeRefused(BrokerError):
    """The broker refused a subscription (typically its ACL)."""

    hint = "check the broker's ACL for this client"
    permanent = True


class BrokerLimitError(BrokerError):
    """A publish does not fit a limit of the broker (its packet size, in MQTT 5 its reason)."""

    hint = "the broker limits packet size; see [broker] max_packet_size in the configuration"


# TLS alerts by which a broker refuses the client's certificate (OpenSSL's names for them).
_CERT_REFUSALS = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "ACCESS_DENIED",
)


def client_certificate_error(url: str, what: str, *, has_cert: bool) -> BrokerTlsError | None:
    """The one-line error for a TLS failure (`what`, OpenSSL's text) that says the broker wants
    a client certificate, or refused ours; None when it says something else. Permanent:
    retrying with the same files cannot succeed."""
    text = what.upper()
    if "CERTIFICATE_REQUIRED" in text or (not has_cert and "HANDSHAKE_FAILURE" in text):
        err = BrokerTlsError(
            f"the broker at {url} requires a client certificate",
            hint="set [broker] cert_file and key_file to a certificate the broker's CA signed",
        )
    elif alert := next((a for a in _CERT_REFUSALS if a in text), None):
        err = BrokerTlsError(
            f"the broker at {url} refused the client certificate"
            f" ({alert.lower().replace('_', ' ')})",
            hint="[broker] cert_file must be signed by a CA the broker trusts, and be valid",
        )
    else:
        return None
    err.permanent = True
    return err
